#!/bin/sh
# The coordinator container: start the SuperLink (TLS, node authentication, run store from
# VEIL_STORE), register the sites' public node keys (each named by its key; recorded in the
# same store, so `veil coordinator sites` lists them), then mark the container ready.
set -eu
C=/coordinator
rm -f "$C/state/ready"
veil coordinator start --certs "$C/certs" --host 0.0.0.0 --port 8000 \
    --state "$C/state/superlink.db" --coordinator-key "$C/coordinator.ckks" \
    --artifacts-dir "$C/artifacts" --researchers "$C/researchers" &
pid=$!
trap 'kill -TERM "$pid"; wait "$pid"' TERM INT
python -c "
import socket, sys, time
for _ in range(120):
    try:
        socket.create_connection(('127.0.0.1', 8000), 1).close(); sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit('the SuperLink did not start listening')
"
for pub in "$C"/nodes/*.pub; do
    veil coordinator register "$pub" --coordinator 127.0.0.1:8000 --ca "$C/certs/ca.crt" \
        || echo "$(basename "$pub"): already registered (or see the error above)"
done
touch "$C/state/ready"
wait "$pid"
