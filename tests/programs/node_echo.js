// A `net` echo server, as node programs write one. Prints "port N" once it
// listens; exits 0 on SIGINT (so that exit-time reports run).
const net = require('net');
const server = net.createServer((socket) => {
  socket.on('data', (data) => socket.write(data));
  socket.on('error', () => {});
});
server.listen(0, '127.0.0.1', () => console.log('port ' + server.address().port));
process.on('SIGINT', () => process.exit(0));
