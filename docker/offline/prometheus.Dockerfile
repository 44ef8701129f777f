# Offline stand-in for prom/prometheus, from Debian's prometheus package (2.42 in bookworm).
# Same command-line interface; the configuration is mounted at /etc/prometheus/prometheus.yml;
# wget for the compose healthcheck, as in the official (busybox) image.
ARG DEBIAN_IMAGE=fednano-debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o prometheus -g prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
