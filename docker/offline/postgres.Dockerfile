# Offline stand-in for the official postgres image, from Debian's postgresql package
# (PostgreSQL 15 in bookworm; the default stack uses postgres:16 — a data volume does not move
# between the two majors).
#
# The same interface as the official image where docker-compose.yml uses it: POSTGRES_USER,
# POSTGRES_DB, POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, data in /var/lib/postgresql/data
# (initialised on the first start, scram-sha-256 for network clients), pg_isready on PATH,
# the server running as the postgres user.
ARG DEBIAN_IMAGE=fednano-debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 "$PGDATA" \
 && install -d -o postgres -g postgres /run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
