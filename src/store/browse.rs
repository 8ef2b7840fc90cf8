//! What the dashboard browses, a bounded page at a time: the catalogue
//! searched by id prefix, title and category, and one shopper's events,
//! newest first. Pages continue after a key (keyset pagination), so a page
//! costs the same wherever it is and no match is shown twice or skipped.

use sqlx::Row;

use super::serving::UserEventRow;
use super::{Db, IdKind, Result, Store};
use crate::domain::{Item, UserEvent};

/// What items to list.
#[derive(Debug, Clone, Default)]
pub struct ItemSearch<'a> {
    /// Items whose id starts with it or whose title contains it, ignoring
    /// case (ASCII letters on SQLite, every letter on PostgreSQL).
    pub text: Option<&'a str>,
    /// Items with this category among theirs.
    pub category: Option<&'a str>,
    /// Items with an id after this one (`""`: from the start).
    pub after: &'a str,
    pub limit: i64,
}

/// `text` with LIKE's wildcards and the escape character escaped (`\`).
fn like_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Store {
    /// Up to `limit` live items matching `search`, in item id order. The
    /// statement holds only the conditions asked for, so that the planner
    /// walks the primary key in order and stops once the page is full.
    pub async fn search_items(&self, search: &ItemSearch<'_>) -> Result<Vec<Item>> {
        let postgres = matches!(self.db, Db::Postgres(_));
        // ILIKE (PostgreSQL) folds every letter's case; SQLite's LIKE that
        // of ASCII letters.
        let like = if postgres { "ILIKE" } else { "LIKE" };
        let mut sql = String::from(
            "SELECT item_id, title, categories, price, available, attributes FROM items
             WHERE NOT deleted AND item_id > $1",
        );
        let mut binds: Vec<String> = vec![search.after.to_owned()];
        let mut bind = |sql: &mut String, value: String| {
            binds.push(value);
            sql.push_str(&format!("${}", binds.len()));
        };
        if let Some(text) = search.text {
            let escaped = like_escaped(text);
            sql.push_str(&format!(" AND (item_id {like} "));
            bind(&mut sql, format!("{escaped}%"));
            sql.push_str(&format!(" ESCAPE '\\' OR title {like} "));
            bind(&mut sql, format!("%{escaped}%"));
            sql.push_str(" ESCAPE '\\')");
        }
        if let Some(category) = search.category {
            // The stored JSON text holds the category as a JSON string: a
            // cheap test first, then the exact one on the array.
            let quoted = like_escaped(&serde_json::Value::from(category).to_string());
            sql.push_str(" AND categories LIKE ");
            bind(&mut sql, format!("%{quoted}%"));
            sql.push_str(" ESCAPE '\\' AND ");
            if postgres {
                sql.push_str("categories::jsonb @> jsonb_build_array(CAST(");
                bind(&mut sql, category.to_owned());
                sql.push_str(" AS TEXT))");
            } else {
                sql.push_str("EXISTS (SELECT 1 FROM json_each(items.categories) WHERE json_each.value = ");
                bind(&mut sql, category.to_owned());
                sql.push(')');
            }
        }
        sql.push_str(&format!(" ORDER BY item_id LIMIT {}", search.limit.max(0)));
        let items = on_pool!(self, pool => {
            let mut query = sqlx::query(&sql);
            for value in &binds {
                query = query.bind(value);
            }
            query
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|row| Item {
                    item_id: row.get("item_id"),
                    title: row.get("title"),
                    categories: serde_json::from_str(row.get::<&str, _>("categories")).unwrap_or_default(),
                    price: row.get("price"),
                    available: row.get("available"),
                    attributes: serde_json::from_str(row.get::<&str, _>("attributes")).unwrap_or_default(),
                })
                .collect::<Vec<_>>()
        });
        Ok(items)
    }

    /// Up to `limit` of the user's events older than `before` (timestamp,
    /// arrival number), newest first (ties: later arrival first); from the
    /// newest when `before` is `None`.
    pub async fn user_events_before(
        &self,
        user_id: &str,
        before: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<UserEvent>> {
        const SELECT: &str = "SELECT item_id, kind, value, ts, session_id, seq FROM events
             WHERE user_id = $1 AND (ts < $2 OR (ts = $2 AND seq < $3))
             ORDER BY ts DESC, seq DESC LIMIT $4";
        let (ts, seq) = before.unwrap_or((i64::MAX, i64::MAX));
        let rows = on_pool!(self, pool => {
            sqlx::query_as::<_, UserEventRow>(SELECT)
                .bind(self.ids.seal(IdKind::User, user_id))
                .bind(ts)
                .bind(seq)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        self.open_user_events(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::like_escaped;

    #[test]
    fn wildcards_match_themselves() {
        assert_eq!(like_escaped("50%_off\\"), "50\\%\\_off\\\\");
        assert_eq!(like_escaped("shoe"), "shoe");
    }
}
