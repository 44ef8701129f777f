#!/bin/sh
# As the official eclipse-mosquitto image's entrypoint: started as root, give /mosquitto to the
# mosquitto user (the broker drops to it), then run the command.
set -e
if [ "$(id -u)" = "0" ] && [ -d /mosquitto ]; then
  chown -R mosquitto:mosquitto /mosquitto 2>/dev/null || true
fi
exec "$@"
