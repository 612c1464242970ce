# QFLARE server image: the qflare binary (server, admin CLI, and the enclave
# via `qflare enclave`) and the standalone qflare-enclave next to it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin qflare --bin qflare-enclave --bin qflare-edge

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/qflare --create-home qflare
COPY --from=build /src/target/release/qflare /src/target/release/qflare-enclave /src/target/release/qflare-edge /usr/local/bin/
COPY config/global_config.yaml /etc/qflare/global_config.yaml
USER qflare
WORKDIR /var/lib/qflare
EXPOSE 8443 9464
ENTRYPOINT ["qflare", "--config", "/etc/qflare/global_config.yaml"]
CMD ["server"]
