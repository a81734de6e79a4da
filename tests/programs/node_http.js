// An `http` hello server, as node programs write one. Prints "port N" once it
// listens; exits 0 on SIGINT (so that exit-time reports run).
const http = require('http');
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 12 });
  res.end('hello world\n');
});
server.listen(0, '127.0.0.1', () => console.log('port ' + server.address().port));
process.on('SIGINT', () => process.exit(0));
