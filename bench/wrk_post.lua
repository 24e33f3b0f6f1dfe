-- wrk script: POST the bodies of a file written by bench/workload.py (write_bodies), in turn,
-- and print the results as one JSON line from done(), for bench/load.py to parse.
--
--   wrk -t2 -c32 -d10s -s bench/wrk_post.lua http://127.0.0.1:PORT/predictions/dlrm -- bodies.bin
--
-- Each body is framed by a line "<content type> <binary header length or -1> <body length>"
-- followed by exactly that many bytes: bodies may be binary tensors, newlines included.

local requests = {}
local next_index = 0

function init(args)
  local file = assert(io.open(args[1], "rb"))
  while true do
    local line = file:read("*l")
    if line == nil then break end
    local content_type, header_length, length = line:match("^(%S+) (%-?%d+) (%d+)$")
    assert(content_type, "bad frame line in " .. args[1] .. ": " .. line)
    local body = file:read(tonumber(length))
    local headers = { ["Content-Type"] = content_type }
    if tonumber(header_length) >= 0 then
      headers["Inference-Header-Content-Length"] = header_length
    end
    -- Formatted once here, so that sending a request costs wrk no Lua string building.
    requests[#requests + 1] = wrk.format("POST", nil, headers, body)
  end
  file:close()
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
