# Build stage: the release binary (protox compiles the protos, so no protoc is needed).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/kas

# Runtime: a small Debian with CA certificates, running as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/kas --create-home kas
COPY --from=build /src/target/release/kas /usr/local/bin/kas
USER kas
WORKDIR /var/lib/kas
ENV KAS_DATA_DIR=/var/lib/kas \
    KAS_HTTP_ADDR=0.0.0.0:8080 \
    KAS_AGENT_ADDR=0.0.0.0:8150 \
    KAS_API_ADDR=0.0.0.0:8153 \
    KAS_LOG_FORMAT=json
EXPOSE 8080 8150 8153
STOPSIGNAL SIGTERM
ENTRYPOINT ["kas"]
CMD ["serve"]
