-- wrk script: POST JSON bodies read from a file (one body per line, sent in turn)
-- and print the results as one JSON line from done(), for bench/load.py to parse.
--
--   wrk -t2 -c32 -d10s -s bench/wrk_post.lua http://127.0.0.1:PORT/predictions/dlrm -- bodies.jsonl

local requests = {}
local next_index = 0

function init(args)
  for line in io.lines(args[1]) do
    -- Formatted once here, so that sending a request costs wrk no Lua string building.
    requests[#requests + 1] = wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, line)
  end
  assert(#requests > 0, "no request bodies in " .. args[1])
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
