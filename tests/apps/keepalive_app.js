// A server and a client connected to it, both idle: the Node.js application of test_apps.py.
// Arguments: PORT [DELAY_MS]. With DELAY_MS both sockets call socket.setKeepAlive(true, DELAY_MS).
"use strict";
const net = require("net");
const [port, delay] = process.argv.slice(2).map(Number);
const tune = (s) => { if (delay) s.setKeepAlive(true, delay); };
const server = net.createServer((accepted) => tune(accepted));
server.listen(port, "127.0.0.1", () => {
  const client = net.connect(port, "127.0.0.1", () => console.log(client.localPort));
  tune(client);
});
