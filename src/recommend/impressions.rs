//! Recommendation answers counted as impressions of their model version,
//! kept in memory and handed to the store about once a second (clicks are
//! joined to them there).

use std::sync::Mutex;

use crate::domain::Impression;

#[derive(Debug, Default)]
pub struct Impressions(Mutex<Vec<Impression>>);

impl Impressions {
    /// Counts one impression; `take` hands them to the store.
    pub fn record(&self, impression: Impression) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(impression);
    }

    pub fn take(&self) -> Vec<Impression> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back impressions the store could not take, before any counted
    /// since.
    pub fn put_back(&self, mut impressions: Vec<Impression>) {
        let mut pending = self.0.lock().unwrap_or_else(|e| e.into_inner());
        impressions.append(&mut pending);
        *pending = impressions;
    }
}
