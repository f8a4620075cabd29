// Sends one notification with @parse/node-apn, unmodified, pointed at the
// courier instead of Apple.
//
// Usage: node apn_send.js PORT CA_PEM KEY_P8 KEY_ID TEAM_ID TOPIC TOKEN MESSAGE
// Prints "sent <n> failed <n>", then each failure's status and reason.
const fs = require('fs');
const apn = require('@parse/node-apn');

const [port, ca, key, keyId, teamId, topic, token, message] = process.argv.slice(2);
const provider = new apn.Provider({
  token: { key: fs.readFileSync(key, 'utf8'), keyId, teamId },
  address: 'localhost',
  port: Number(port),
  ca: [fs.readFileSync(ca)],
  production: false,
});
const note = new apn.Notification();
note.alert = message;
note.topic = topic;
note.pushType = 'alert';
note.priority = 10;
note.collapseId = 'greeting';
provider.send(note, [token, 'ab'.repeat(32)]).then((result) => {
  console.log(`sent ${result.sent.length} failed ${result.failed.length}`);
  for (const f of result.failed) {
    console.log(`${f.status} ${f.response ? f.response.reason : f.error}`);
  }
  provider.shutdown();
});
