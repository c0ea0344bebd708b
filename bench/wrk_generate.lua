-- wrk script of the benchmarks (`wrk` in common.py): POST /v1/generate with the JSON bodies of a file (one a
-- line, argument after `--`), in turn; counts 200, 503 and other answers. wrk sends a connection's next request
-- as soon as its answer arrives, so a client told 503 retries at once (Retry-After is ignored on purpose).
-- done() prints one line, `wrk-result {json}`, that common.py reads.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  requests = {}
  for body in io.lines(args[1]) do
    local headers = { ["Content-Type"] = "application/json" }
    table.insert(requests, wrk.format("POST", "/v1/generate", headers, body))
  end
  next_request = 0
  ok, rejected, other = 0, 0, 0
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
  elseif status == 503 then
    rejected = rejected + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local ok, rejected, other = 0, 0, 0
  for _, thread in ipairs(threads) do
    ok = ok + thread:get("ok")
    rejected = rejected + thread:get("rejected")
    other = other + thread:get("other")
  end
  local errors = summary.errors
  io.write(string.format(
    'wrk-result {"ok": %d, "rejected": %d, "other": %d, "seconds": %.6f, '
      .. '"socket_errors": %d, "timeouts": %d, "latency_p50_ms": %.3f, "latency_p99_ms": %.3f}\n',
    ok, rejected, other, summary.duration / 1e6,
    errors.connect + errors.read + errors.write, errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000
  ))
end
