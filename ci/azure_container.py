"""Creates a blob container on an Azurite emulator with a SharedKey-signed request (the
emulator's well-known account), standard library only. Usage: azure_container.py URL NAME"""
import base64
import hashlib
import hmac
import sys
import urllib.request
from email.utils import formatdate

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
VERSION = "2021-08-06"

base, name = sys.argv[1].rstrip("/"), sys.argv[2]
date = formatdate(usegmt=True)
# Path-style emulator URLs put the account in the path, so it appears twice here.
resource = f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
headers = f"x-ms-date:{date}\nx-ms-version:{VERSION}\n"
to_sign = "PUT\n" + "\n" * 11 + headers + resource
sig = base64.b64encode(
    hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
).decode()
req = urllib.request.Request(
    f"{base}/{ACCOUNT}/{name}?restype=container",
    method="PUT",
    headers={
        "x-ms-date": date,
        "x-ms-version": VERSION,
        "Authorization": f"SharedKey {ACCOUNT}:{sig}",
        "Content-Length": "0",
    },
)
try:
    urllib.request.urlopen(req, timeout=10)
except urllib.error.HTTPError as e:
    if e.code != 409:  # 409: it exists already
        raise
