# recd: multi-stage build. The builder compiles the release binary; the
# runtime image is Debian slim with only the binary and CA certificates,
# running as an unprivileged user.
#
#   docker build -t recd .
#   docker run -p 8080:8080 -e RECD_API_KEYS=admin:change-me -v recd-data:/var/lib/recd recd

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY examples ./examples
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin recd \
    && rm -rf src
COPY src ./src
COPY migrations ./migrations
COPY config ./config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin recd

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/recd --create-home recd
COPY --from=builder /src/target/release/recd /usr/local/bin/recd
WORKDIR /var/lib/recd
USER recd
# Listening beyond loopback needs API keys (RECD_API_KEYS); recd refuses to
# start without them.
ENV RECD_LISTEN=0.0.0.0:8080 \
    RECD_DATABASE_URL=sqlite:///var/lib/recd/recd.db \
    RECD_LOG_FORMAT=json
VOLUME ["/var/lib/recd"]
EXPOSE 8080
# The defaults of config/default.toml are built into the binary; mount a file
# and pass `--config FILE` to layer another over them.
ENTRYPOINT ["recd"]
CMD ["serve"]
