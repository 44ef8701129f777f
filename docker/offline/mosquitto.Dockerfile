# Offline stand-in for eclipse-mosquitto:2, from Debian's mosquitto package.
#
# It keeps the interface docker-compose.yml relies on: /usr/sbin/mosquitto and mosquitto_sub,
# the folders /mosquitto/{config,data,log}, the user mosquitto with uid/gid 1883 (the cloud
# image gives its user that group so the broker can read the password and ACL files), and
# /docker-entrypoint.sh, which hands /mosquitto to that user when started as root.
# Debian bookworm ships Mosquitto 2.0.11 (the official image is a later 2.0.x); its
# dynamic-security plugin is linked where the official image has it.
ARG DEBIAN_IMAGE=fednano-debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN groupadd --system --gid 1883 mosquitto \
 && useradd --system --uid 1883 --gid mosquitto --home-dir /var/lib/mosquitto \
      --shell /usr/sbin/nologin mosquitto \
 && apt-get update \
 && apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so \
 && install -d -o mosquitto -g mosquitto /mosquitto/config /mosquitto/data /mosquitto/log
COPY mosquitto-entrypoint.sh /docker-entrypoint.sh
# executable: docker/mosquitto/start.sh execs it, as in the official image
RUN chmod 0755 /docker-entrypoint.sh
EXPOSE 1883 8883
ENTRYPOINT ["/bin/sh", "/docker-entrypoint.sh"]
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
