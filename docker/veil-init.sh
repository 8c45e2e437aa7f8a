#!/bin/sh
# One-shot federation set-up for the sample: certificates, node keys, a CKKS key set, the
# researcher's signing key (admitted by the coordinator, trusted by both sites), each site's
# data slice and site.yaml. Idempotent: does nothing when the coordinator has a CA.
set -eu
C=/coordinator
if [ -f "$C/certs/ca.crt" ]; then
    echo "federation already initialised"
    exit 0
fi
veil certs create "$C/certs" --host coordinator --host localhost --host 127.0.0.1
keys=$(mktemp -d)
rmdir "$keys"
veil keys create "$keys"
cp "$keys/coordinator.ckks" "$C/coordinator.ckks"
mkdir -p "$C/nodes" "$C/state"
cp "$C/certs/ca.crt" /researcher/ca.crt
cp "$keys/secret.ckks" /researcher/secret.ckks
veil certs researcher-key /researcher/researcher-key  # signs every run; only its .pub leaves
mkdir -p "$C/researchers"
cp /researcher/researcher-key.pub "$C/researchers/researcher-key.pub"
for i in 0 1; do
    S="/site-$i"
    veil certs node-key --site "site-$i" "$S"  # site-$i.node-key (stays here) and site-$i.node-key.pub
    cp "$S/site-$i.node-key.pub" "$C/nodes/"
    cp "$C/certs/ca.crt" "$S/ca.crt"
    cp "$keys/secret.ckks" "$S/secret.ckks"
    mkdir -p "$S/ledger" "$S/researchers"
    cp /researcher/researcher-key.pub "$S/researchers/researcher-key.pub"
    python -c "from client.data import write_sample_npz; write_sample_npz('$S/data.npz', $i, 2)"
    cat > "$S/site.yaml" <<YAML
site_id: site-$i
data: {format: npz, path: data.npz}
ledger: ledger/site-$i.ledger
keys: secret.ckks
policy: {epsilon_cap: 50.0, delta: 1.0e-5, trusted_researchers: [researchers]}
device: auto
coordinator: {address: "coordinator:8000", root_certificates: ca.crt, node_key: site-$i.node-key}
YAML
    veil site init --config "$S/site.yaml"  # creates the ledger and pins its id in site.yaml
done
rm -rf "$keys"
echo "federation initialised: coordinator, site-0, site-1"
