-- wrk script for the serving benchmarks (benchmarks/load.py runs it): POSTs request bodies read
-- from files, in rotation, and reports in one line that load.py parses.
--
--   wrk ... -s wrk_post.lua URL -- BODY_DIR COUNT EXPECT "Header: value" ...
--
-- BODY_DIR holds COUNT files named 0000.body, 0001.body, ...; EXPECT (may be empty) is a string
-- every good answer's body contains: an answer with a status below 400 without it counts as bad,
-- as wrk itself counts statuses of 400 and above. `sent` counts the requests made, so that load.py
-- can tell a target that answered nothing from one that was never asked.

local bodies, headers, expect = {}, {}, ""
-- Globals: done() reads them from each thread with thread:get, which sees only globals.
sent, bad = 0, 0

function setup(thread)
  threads = threads or {}
  table.insert(threads, thread)
end

function init(args)
  local dir, count = args[1], tonumber(args[2])
  expect = args[3] or ""
  for i = 0, count - 1 do
    local f = assert(io.open(string.format("%s/%04d.body", dir, i), "rb"))
    bodies[i + 1] = f:read("*a")
    f:close()
  end
  for i = 4, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
end

function request()
  sent = sent + 1
  return wrk.format("POST", nil, headers, bodies[(sent - 1) % #bodies + 1])
end

function response(status, _, body)
  if status < 400 and expect ~= "" and not (body and body:find(expect, 1, true)) then
    bad = bad + 1
  end
end

function done(summary, latency, _)
  local bad_total, sent_total = 0, 0
  for _, thread in ipairs(threads) do
    bad_total = bad_total + (thread:get("bad") or 0)
    sent_total = sent_total + (thread:get("sent") or 0)
  end
  sent_total = sent_total - 1  -- wrk calls request() once more, on its first thread, to check the script
  local e = summary.errors
  -- timeouts: answers slower than --timeout, counted in requests but not in the latencies (#latency);
  -- dropped: requests whose connection failed while sending or awaiting them (a new one is sent)
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d timed=%d status_errors=%d " ..
    "connect_errors=%d dropped=%d timeouts=%d bad_bodies=%d sent=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), #latency,
    e.status, e.connect, e.read + e.write, e.timeout, bad_total, sent_total))
end
