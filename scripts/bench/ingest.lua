-- wrk script for scripts/bench/ingest.py: replay pre-generated, pre-signed webhook
-- requests, each exactly once, and keep every response's status and body.
--
-- INGEST_DIR (environment) holds requests.<thread> files written by ingest.py: records
-- of "<byte length>\n<raw HTTP/1.1 request>". done() writes INGEST_DIR/responses
-- ("<status> <body>" per line) and INGEST_DIR/summary (key value per line).

local dir = os.getenv("INGEST_DIR")
local threads = {}

function setup(thread)
    thread:set("id", #threads)
    table.insert(threads, thread)
end

function init(args)
    local f = assert(io.open(dir .. "/requests." .. wrk.thread:get("id"), "rb"))
    local data = f:read("*a")
    f:close()
    reqs = {}
    local pos = 1
    while pos <= #data do
        local nl = data:find("\n", pos, true)
        local len = tonumber(data:sub(pos, nl - 1))
        reqs[#reqs + 1] = data:sub(nl + 1, nl + len)
        pos = nl + len + 1
    end
    data = nil
    collectgarbage()
    sent = 0
    exhausted = 0
    got = 0
    out = {}
    -- Only when every pre-generated request is used up: a request no route accepts
    -- (so nothing is recorded twice), and the thread stops.
    spare = "GET /bench-generator-exhausted HTTP/1.1\r\nHost: " .. wrk.host .. "\r\n\r\n"
end

function request()
    sent = sent + 1
    local r = reqs[sent]
    if r == nil then
        exhausted = 1
        wrk.thread:stop()
        return spare
    end
    reqs[sent] = nil  -- each request once; let the memory go
    return r
end

function response(status, headers, body)
    got = got + 1
    out[got] = status .. " " .. body:gsub("\n", " ")
end

function done(summary, latency, requests)
    local f = assert(io.open(dir .. "/responses", "wb"))
    local sent_total, exhausted_any = 0, 0
    for _, thread in ipairs(threads) do
        local lines = thread:get("out")
        for i = 1, #lines do
            f:write(lines[i], "\n")
        end
        sent_total = sent_total + thread:get("sent")
        exhausted_any = math.max(exhausted_any, thread:get("exhausted"))
    end
    f:close()
    local s = assert(io.open(dir .. "/summary", "wb"))
    local errors = summary.errors
    local fields = {
        duration_us = summary.duration, requests = summary.requests, bytes = summary.bytes,
        connect_errors = errors.connect, read_errors = errors.read, write_errors = errors.write,
        status_errors = errors.status, timeouts = errors.timeout,
        p50_us = latency:percentile(50), p90_us = latency:percentile(90),
        p99_us = latency:percentile(99), max_us = latency.max, mean_us = latency.mean,
        sent = sent_total, exhausted = exhausted_any,
    }
    for k, v in pairs(fields) do
        s:write(k, " ", string.format("%.3f", v), "\n")
    end
    s:close()
end
