// Sends one Web Push message with the npm `web-push` package, unmodified.
//
// Usage: node webpush_send.js ENDPOINT P256DH AUTH VAPID_PUBLIC VAPID_PRIVATE MESSAGE
// (keys base64url). Prints the HTTP status, then the Location header. Trust
// comes from NODE_EXTRA_CA_CERTS.
const webpush = require('web-push');

const [endpoint, p256dh, auth, pub, priv, message] = process.argv.slice(2);
webpush
  .sendNotification({ endpoint, keys: { p256dh, auth } }, message, {
    vapidDetails: { subject: 'mailto:ops@example.com', publicKey: pub, privateKey: priv },
    TTL: 60,
    contentEncoding: 'aes128gcm',
  })
  .then((res) => {
    console.log(res.statusCode);
    console.log(res.headers.location || '');
  })
  .catch((err) => {
    console.log(err.statusCode || 'error');
    console.log(err.body || String(err));
  });
