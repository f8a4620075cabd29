"""Sends one Web Push message with pywebpush, unmodified.

Usage: pywebpush_send.py ENDPOINT P256DH AUTH VAPID_PEM MESSAGE [TTL] [TOPIC]
Prints the HTTP status, then the Location header. Trust comes from
REQUESTS_CA_BUNDLE.
"""
import sys

from pywebpush import WebPushException, webpush

endpoint, p256dh, auth, pem, message = sys.argv[1:6]
ttl = int(sys.argv[6]) if len(sys.argv) > 6 else 60
headers = {"Topic": sys.argv[7]} if len(sys.argv) > 7 else {}
try:
    resp = webpush(
        subscription_info={"endpoint": endpoint, "keys": {"p256dh": p256dh, "auth": auth}},
        data=message,
        vapid_private_key=pem,
        vapid_claims={"sub": "mailto:ops@example.com"},
        ttl=ttl,
        headers=headers,
        content_encoding="aes128gcm",
    )
    print(resp.status_code)
    print(resp.headers.get("Location", ""))
except WebPushException as e:
    print(e.response.status_code if e.response is not None else "error")
    print(e.response.text if e.response is not None else str(e))
