# syntax=docker/dockerfile:1
# kas: build with `docker build -t kas .` (BuildKit). Base images are pinned to exact releases;
# pin them by digest as well (`image:tag@sha256:…`) where your registry policy asks for it.

# Build stage: the release binary (protox compiles the protos, so no protoc is needed). The
# toolchain matches the one the project is developed and tested with.
FROM rust:1.95.0-slim-trixie AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and compiled dependencies between builds; the binary is
# copied out of the cached target directory within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --bin kas \
    && cp target/release/kas /usr/local/bin/kas

# Runtime: Debian slim with CA certificates (Redis and PostgreSQL over TLS), running as a numeric
# non-root user so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
FROM debian:trixie-20260202-slim
# ca-certificates comes from Debian's trixie archive at build time, unpinned: a pinned version would break
# the build as soon as a security update replaces it on the mirrors.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kas \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/kas --no-create-home --shell /usr/sbin/nologin kas \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/kas
COPY --from=build /usr/local/bin/kas /usr/local/bin/kas
USER 10001:10001
WORKDIR /var/lib/kas
# Inside a container the listeners must not stay on kas's loopback default: the port mappings
# (and Kubernetes Services) reach the container's own interface.
ENV KAS_DATA_DIR=/var/lib/kas \
    KAS_HTTP_ADDR=0.0.0.0:8080 \
    KAS_AGENT_ADDR=0.0.0.0:8150 \
    KAS_API_ADDR=0.0.0.0:8153 \
    KAS_LOG_FORMAT=json
# The data directory holds the embedded SQLite database and the generated secrets.
VOLUME ["/var/lib/kas"]
EXPOSE 8080 8150 8153
# `kas health` asks GET /healthz on KAS_HTTP_ADDR (0.0.0.0 means loopback): no curl in the image.
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 CMD ["kas", "health", "--timeout", "5"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["kas"]
CMD ["serve"]
