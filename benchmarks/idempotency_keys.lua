-- wrk script for benchmarks/load_benchmark.py: POST a small JSON body with an Idempotency-Key.
--
--   wrk -t2 -c8 -d5s -s idempotency_keys.lua URL -- MODE TAG KEYS BURST
--
-- MODE fresh:  a new key per request (first executions);
--      replay: a key drawn at random from KEYS keys completed before the run;
--      burst:  each key sent BURST times in a row by one thread, whose connections have
--              those requests in flight together (concurrent duplicates).
-- Keys look like UUIDs (two of the compared packages accept nothing else):
-- TAG-THREAD-4000-8000-COUNTER in hex, TAG unique to the run, so the server-side executions of
-- one run can be counted with `key LIKE 'TAG-%'`. Replay keys are TAG-0000-4000-8000-INDEX.
-- done() prints one JSON line: requests, seconds, latency percentiles (microseconds),
-- status counts, and the sum of the X-Bench-Queries header (SQL statements per request).

local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   mode = args[1] or "fresh"
   tag = tonumber(args[2] or "1")
   keys = tonumber(args[3] or "1000")
   burst = tonumber(args[4] or "4")
   math.randomseed(id * 7919 + tag)
   wrk.method = "POST"
   wrk.body = '{"sku": "BOOK-1", "quantity": 2, "customer": "c-4242"}'
   wrk.headers["Content-Type"] = "application/json"
   ok, conflict, other, queries, counted = 0, 0, 0, 0, 0
end

function request()
   local key
   if mode == "replay" then
      key = string.format("%08x-0000-4000-8000-%012x", tag, math.random(0, keys - 1))
   elseif mode == "burst" then
      key = string.format("%08x-%04x-4000-8000-%012x", tag, id, math.floor(counter / burst))
   else
      key = string.format("%08x-%04x-4000-8000-%012x", tag, id, counter)
   end
   counter = counter + 1
   wrk.headers["Idempotency-Key"] = key
   return wrk.format()
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   elseif status == 409 then
      conflict = conflict + 1
   else
      other = other + 1
      if other <= 3 then
         io.stderr:write(string.format("status %d: %s\n", status, string.sub(body, 1, 300)))
      end
   end
   local q = headers["X-Bench-Queries"]
   if q then
      queries = queries + tonumber(q)
      counted = counted + 1
   end
end

function done(summary, latency, requests)
   local t = {ok = 0, conflict = 0, other = 0, queries = 0, counted = 0}
   for _, thread in ipairs(threads) do
      for name, _ in pairs(t) do
         t[name] = t[name] + thread:get(name)
      end
   end
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "seconds": %.6f, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"max_us": %d, "ok": %d, "conflict": %d, "other": %d, "queries": %d, "counted": %d, ' ..
      '"socket_errors": %d}\n',
      summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max, t.ok, t.conflict, t.other, t.queries, t.counted,
      e.connect + e.read + e.write + e.timeout))
end
