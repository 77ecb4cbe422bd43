# syntax=docker/dockerfile:1
#
# The `dmr` binary (server, agent, pki, dev) in a small runtime image.
#
#   docker build -t dmr:local .
#   docker run --rm dmr:local --help
#
# Keys and certificates are never baked in: mount them (compose: the `pki` volume; Kubernetes:
# Secrets) and point TLS_*_FILE / AGENT_PRIVATE_KEY_FILE at them.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

########################################################################################
# Builder: the workspace's `dmr-cli` package, release profile, locked dependencies.
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# aws-lc-sys (rustls / JOSE crypto) builds C (gcc is in the image) and may fall back to cmake;
# protox compiles the .proto in build.rs, so no protoc is needed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The commit reported by the server's dmr_build_info metric (.git is not in the build context):
#   docker build --build-arg DMR_BUILD_COMMIT="$(git rev-parse HEAD)" -t dmr:local .
ARG DMR_BUILD_COMMIT=unknown
# The commit reported by the server's dmr_build_info metric (.git is not in the build context):
#   docker build --build-arg DMR_BUILD_COMMIT="$(git rev-parse HEAD)" -t dmr:local .
ARG DMR_BUILD_COMMIT=unknown
# Cache mounts keep the registry and target/ between builds (BuildKit); the binary is copied
# out of the cached target/ so that it ends up in the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dmr-cli \
    && install -D -m 0755 target/release/dmr /out/dmr

########################################################################################
# Runtime: glibc matching the builder, CA roots for an https CentOps URL, a non-root user.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dmr \
    && useradd --system --uid 10001 --gid dmr --home-dir /nonexistent --no-create-home \
         --shell /usr/sbin/nologin dmr \
    # Mount point for a development PKI (compose): a named volume mounted here starts out owned
    # by the dmr user, so `dmr pki --out /pki` can write into it as non-root.
    && install -d -o dmr -g dmr -m 0750 /pki
COPY --from=builder /out/dmr /usr/local/bin/dmr
USER 10001:10001
# Server: 8075 HTTP (/metrics, /health, /ready), 8076 gRPC (mTLS). Agent: 8077 REST.
EXPOSE 8075 8076 8077
ENV LOGGER_COLORS=false
ENTRYPOINT ["dmr"]
CMD ["--help"]
