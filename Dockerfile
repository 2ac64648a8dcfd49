# syntax=docker/dockerfile:1
# One image with every Spillway binary:
#   /usr/local/bin/spillway-processor  (ENTRYPOINT: the operator creates processor
#                                       Deployments without a command)
#   /usr/local/bin/spillway-operator   (the Helm chart sets `command`)
#   /usr/local/bin/spillway-gateway    (the Helm chart sets `command`)
#   /usr/local/bin/spillway            (the CLI, for `kubectl run`/debugging)
#
#   docker build -t ghcr.io/spillway-dev/spillway:0.1.0 .
#
# Needs BuildKit (the default builder of Docker 23+, and buildx/podman
# build): the first line selects the Dockerfile frontend with RUN --mount.
#
# Pin the base images by digest in CI (`image@sha256:...`); tags are kept
# here so the file stays readable.

# ---- build -------------------------------------------------------------------
# Debian bookworm, like the runtime image below, so the glibc matches.
FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
# Everything the workspace needs (see .dockerignore): every member's manifest
# must be present for `--locked` to resolve the workspace.
COPY . .
# --locked: build exactly the dependency versions in Cargo.lock.
# BuildKit cache mounts keep the crates registry and the target directory
# between builds (a source change rebuilds only the workspace crates). The
# target directory is a cache, not a layer, so the binaries are copied out
# in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p spillway-operator -p spillway-gateway -p spillway-processor -p spillway-cli \
 && mkdir -p /out \
 && cp target/release/spillway-operator target/release/spillway-gateway \
       target/release/spillway-processor target/release/spillway /out/

# ---- runtime -----------------------------------------------------------------
# glibc, libgcc, CA certificates, /etc/passwd with `nonroot` (65532); no shell,
# no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.source="https://github.com/spillway-dev/spillway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="Spillway: operator, gateway, processor and CLI"
COPY --from=build /out/ /usr/local/bin/
# Numeric, so `runAsNonRoot: true` can verify it without reading /etc/passwd.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/spillway-processor"]
