// A small Node.js HTTP app holding its state in JS, for tests/test_cxlfork_web.py.
// State: a counter, a 1M-element array, a Float64Array. Each answer is JSON with that
// state and the sums over both arrays (recomputed each request, so a clone whose heap is wrong
// says so). Routes:
//   /inc       counter += 1
//   /push      big.push(counter)
//   /gc        allocate ~200 MB of short-lived objects (scavenges and a full GC on V8's
//              helper threads), then answer
//   /jit       compile a new function from source (new Function) and run it hot: new JIT
//              code in the clone
//   /pool      crypto.pbkdf2 + fs.readFile: work on libuv's threadpool threads
//   /timer     the count of a setInterval(10 ms) timer since start
// argv: port [path of a file /pool reads]
'use strict';
const http = require('http');
const crypto = require('crypto');
const fs = require('fs');
const port = +process.argv[2];
const poolFile = process.argv[3] || __filename;
let counter = 0;
let ticks = 0;
const big = new Array(1 << 20);
for (let i = 0; i < big.length; i++) big[i] = (i * 7) % 1000;
const typed = new Float64Array(1 << 20).map((_, i) => i * 0.5);
setInterval(() => { ticks++; }, 10);

function sum(a) { let s = 0; for (let i = 0; i < a.length; i++) s += a[i]; return s; }
function state(extra) {
  return Object.assign({pid: process.pid, counter, len: big.length, sum: sum(big),
                        tsum: sum(typed)}, extra || {});
}
function churn() {
  let keep = 0;
  for (let r = 0; r < 50; r++) {
    const junk = [];
    for (let i = 0; i < 40000; i++) junk.push({i, s: 'x' + i, a: [i, i + 1]});
    keep += junk[r].i;
  }
  return keep;
}
function jit() {
  const f = new Function('n', 'let s = 0; for (let i = 0; i < n; i++) s += (i * 3) % 7; return s;');
  let s = 0;
  for (let r = 0; r < 2000; r++) s += f(1000);
  return s;
}

http.createServer((req, res) => {
  const reply = (o) => res.end(JSON.stringify(o) + '\n');
  if (req.url === '/inc') counter++;
  if (req.url === '/push') big.push(counter);
  if (req.url === '/gc') return reply(state({churn: churn()}));
  if (req.url === '/jit') return reply(state({jit: jit()}));
  if (req.url === '/timer') return reply(state({ticks}));
  if (req.url === '/pool') {
    return crypto.pbkdf2('secret', 'salt', 20000, 32, 'sha256', (err, key) => {
      if (err) throw err;
      fs.readFile(poolFile, (err2, data) => {
        if (err2) throw err2;
        reply(state({key: key.toString('hex'),
                     file: crypto.createHash('sha256').update(data).digest('hex')}));
      });
    });
  }
  reply(state());
}).listen(port, '127.0.0.1', () => console.log('ready'));
