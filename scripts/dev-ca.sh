#!/usr/bin/env bash
# Development CA for mutual TLS: writes into DIR (default ./dev-certs) a CA (ca.pem,
# ca.key), a server certificate for localhost / 127.0.0.1 (server.pem, server.key) and a
# client certificate (client.pem, client.key), all valid 30 days. For development only:
# the CA key sits beside the certificates. Needs openssl.
#   kv-server --tls-cert DIR/server.pem --tls-key DIR/server.key --tls-client-ca DIR/ca.pem
#   kv-client --tls-ca DIR/ca.pem --tls-cert DIR/client.pem --tls-key DIR/client.key ...
set -euo pipefail
dir="${1:-dev-certs}"
mkdir -p "$dir"
cd "$dir"
days=30
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=capkv dev CA" -keyout ca.key -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
issue() { # $1 = name, $2 = extensions
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=capkv $1" \
        -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$2" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
issue server "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
issue client "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 600 ./*.key
echo "dev CA and certificates written to $(pwd)"
