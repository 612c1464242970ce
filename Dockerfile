# QFLARE image: the qflare binary (server, admin CLI, and the enclave via
# `qflare enclave`), the standalone qflare-enclave next to it (the server
# spawns that one, so its SHA-384 is the enclave measurement devices pin),
# and the device, qflare-edge. Built with the dist profile (Cargo.toml:
# release, no debug info, stripped, thin LTO); docs/enclave.md says why the
# measurement is that of this build.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked --bin qflare --bin qflare-enclave --bin qflare-edge

FROM debian:bookworm-slim
# The state directory of the server and the identity directory of a device
# are volume mount points: created here, owned by the non-root user and
# private (0700), so that a fresh named volume takes over that owner and
# mode and the server can write its keys there.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/qflare --create-home qflare \
 && install -d -o qflare -g qflare -m 0700 /var/lib/qflare/state /var/lib/qflare/edge
COPY --from=build /src/target/dist/qflare /src/target/dist/qflare-enclave /src/target/dist/qflare-edge /usr/local/bin/
COPY config/global_config.yaml /etc/qflare/global_config.yaml
USER qflare
WORKDIR /var/lib/qflare
EXPOSE 8443 9464
ENTRYPOINT ["qflare", "--config", "/etc/qflare/global_config.yaml"]
CMD ["server"]
