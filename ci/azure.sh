# Sourced by .ci/run: starts an Azure Blob Storage emulator (Azurite, from npm) on 127.0.0.1 and
# a free port, creates a container, and exports what the object-store tests read:
#   AZURE_STORAGE_USE_EMULATOR=true, AZURITE_BLOB_STORAGE_URL (object_store's emulator
#   settings: account devstoreaccount1 with its well-known key), MOSAIC_TEST_AZ_URL
#   (az://mosaic-test/ci).
# `azure_stop` stops it. Azurite is installed under ${MOSAIC_CI_CACHE:-~/.cache/mosaic-ci}; with
# no npm or no registry it says so loudly, and the Azure tests fail under .ci/run
# (MOSAIC_REQUIRE_SERVERS=1) or skip without it.
azure_start() {
  local cache="${MOSAIC_CI_CACHE:-$HOME/.cache/mosaic-ci}"
  local dir="$cache/azurite"
  local bin="$dir/node_modules/.bin/azurite-blob"
  if [ ! -x "$bin" ]; then
    mkdir -p "$dir"
    if ! command -v npm >/dev/null 2>&1 \
      || ! timeout 300 npm install --silent --prefix "$dir" azurite@3.37.0 >/dev/null 2>&1; then
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
      echo "!! SKIPPED: Azure Blob emulator (Azurite): npm or its registry unavailable;   !!"
      echo "!! the az:// tests say so and pass.                                           !!"
      echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
      return 0
    fi
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  AZURITE_DIR=$(mktemp -d)
  "$bin" --blobHost 127.0.0.1 --blobPort "$port" --location "$AZURITE_DIR" --silent \
    --skipApiVersionCheck >"$AZURITE_DIR/azurite.log" 2>&1 &
  AZURITE_PID=$!
  local i
  for i in $(seq 1 100); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; then break; fi
    sleep 0.1
  done
  python3 ci/azure_container.py "http://127.0.0.1:$port" mosaic-test
  export AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$port"
  export MOSAIC_TEST_AZ_URL="az://mosaic-test/ci"
  echo "Azure Blob emulator (Azurite) on $AZURITE_BLOB_STORAGE_URL, container mosaic-test"
}

azure_stop() {
  if [ -n "${AZURITE_PID:-}" ]; then
    kill "$AZURITE_PID" 2>/dev/null || true
    wait "$AZURITE_PID" 2>/dev/null || true
    rm -rf "${AZURITE_DIR:-}"
    AZURITE_PID=
  fi
}
