# Sourced by .ci/run: starts an S3-compatible test server (moto) on 127.0.0.1 and a free port,
# creates a bucket, and exports what the object-store tests read:
#   AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
#   MOSAIC_TEST_S3_URL (s3://mosaic-test/ci), and MOSAIC_TEST_MOTO_SERVER (the moto_server
#   binary, for tests that run and restart a server of their own).
# `s3_stop` stops the server. moto comes from a venv cached under
# ${MOSAIC_CI_CACHE:-~/.cache/mosaic-ci}; with no package registry reachable it says so loudly, and
# the object-store tests fail under .ci/run (MOSAIC_REQUIRE_SERVERS=1) or skip without it.
s3_start() {
  source ci/venv.sh
  install_moto() { "$VENV/bin/python" -m pip install -q "moto[server]"; }
  cached_venv s3-venv "import moto.server" \
    "S3 test server (moto); object-store tests run against local folders only" install_moto || return 0
  local venv="$VENV"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/moto-$port.log" 2>&1 &
  S3_PID=$!
  local i
  for i in $(seq 1 100); do
    if curl -s -o /dev/null "http://127.0.0.1:$port/"; then break; fi
    sleep 0.1
  done
  curl -sf -X PUT "http://127.0.0.1:$port/mosaic-test" -o /dev/null
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true
  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
  export MOSAIC_TEST_S3_URL="s3://mosaic-test/ci"
  export MOSAIC_TEST_MOTO_SERVER="$venv/bin/moto_server"
  echo "S3 test server (moto) on $AWS_ENDPOINT_URL, bucket mosaic-test"
}

s3_stop() {
  if [ -n "${S3_PID:-}" ]; then
    kill "$S3_PID" 2>/dev/null || true
    wait "$S3_PID" 2>/dev/null || true
    S3_PID=
  fi
}
