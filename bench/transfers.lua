-- wrk script: two-entry transfers with unique ids between pre-created accounts (bench/compare.py).
--
--   BENCH_HOSTS=127.0.0.1:8080,127.0.0.1:8081 BENCH_BATCH=0 BENCH_PREFIX=r1 \
--     wrk -t2 -c64 -d10s --latency --timeout 10s -s bench/transfers.lua http://127.0.0.1:8080
--
-- Environment (all optional but BENCH_PREFIX):
--   BENCH_HOSTS      host:port list; wrk thread i sends to host i mod n (default: the URL's host)
--   BENCH_BATCH      0: POST /v1/transactions, one transfer; N: POST /v1/transactions/batch of N
--   BENCH_PREFIX     transaction ids are <prefix>.<thread>.<n>{g<k>}: unique while the prefix is,
--                    with the tag of the debited account's group (the id's home is its shard)
--   BENCH_GROUPS, BENCH_PER_GROUP   accounts a<i>:{g<k>}, i < per group, k < groups; a transfer
--                    moves money between two accounts of one group (one hash tag: one shard)
--   BENCH_MODE       "tagged" (the default, as above); "untagged": ids without the tag, so their
--                    home is any shard (the cost of ids a client does not tag); "cross": the credited
--                    account is from group BENCH_PARTNERS[k] (comma-separated, one per group), which
--                    the caller chose on another shard: every transfer is cross-shard
--   BENCH_AMOUNT_MAX amounts are 1..this; BENCH_CURRENCY the currency
--   BENCH_TOKEN      a bearer token every request carries (a cluster with credentials on)
--
-- Every response is checked: non-2xx answers, replays (Idempotent-Replayed / "replayed":true) and
-- batch items that did not answer 201 are counted, and done() prints one line for the caller:
--   BENCH_RESULT {"requests": ..., "transfers_ok": ..., "non2xx": ..., ...}

local hosts = {}
for h in string.gmatch(os.getenv("BENCH_HOSTS") or "", "[^,]+") do
  local host, port = string.match(h, "^(.+):(%d+)$")
  table.insert(hosts, {host, port})
end
local batch = tonumber(os.getenv("BENCH_BATCH") or "0")
local prefix = os.getenv("BENCH_PREFIX") or "wrk"
local groups = tonumber(os.getenv("BENCH_GROUPS") or "512")
local per_group = tonumber(os.getenv("BENCH_PER_GROUP") or "8")
local amount_max = tonumber(os.getenv("BENCH_AMOUNT_MAX") or "1000")
local currency = os.getenv("BENCH_CURRENCY") or "USD"
local mode = os.getenv("BENCH_MODE") or "tagged"
local partners = {}
for p in string.gmatch(os.getenv("BENCH_PARTNERS") or "", "[^,]+") do
  table.insert(partners, tonumber(p))
end
if mode == "cross" and #partners ~= groups then
  error("BENCH_MODE=cross needs BENCH_PARTNERS with one group per group")
end
local id_shape = mode == "untagged" and '"%s.%d.%d"' or '"%s.%d.%d{g%d}"'
local path = batch > 0 and "/v1/transactions/batch" or "/v1/transactions"
local headers = {["Content-Type"] = "application/json"}
local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  headers["Authorization"] = "Bearer " .. token
end
local shape = '{"id":%s,"debit_account_id":"a%d:{g%d}","credit_account_id":"a%d:{g%d}",'
  .. '"amount":%d,"currency":"' .. currency .. '"}'

local threads = {}

function setup(thread)
  local n = #threads
  if #hosts > 0 then
    local h = hosts[(n % #hosts) + 1]
    thread.addr = wrk.lookup(h[1], h[2])[1]
  end
  thread:set("tid", n)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(7919 * (tid + 1))
  seq = 0
  transfers_ok = 0
  non2xx = 0
  replays = 0
  failed_items = 0
  first_error = ""
end

local function transfer()
  seq = seq + 1
  local g = math.random(0, groups - 1)
  local d = math.random(0, per_group - 1)
  local c = (d + math.random(1, per_group - 1)) % per_group
  local h = mode == "cross" and partners[g + 1] or g
  local id = string.format(id_shape, prefix, tid, seq, g)
  return string.format(shape, id, d, g, c, h, math.random(1, amount_max))
end

function request()
  if batch == 0 then
    return wrk.format("POST", path, headers, transfer())
  end
  local items = {}
  for i = 1, batch do
    items[i] = transfer()
  end
  return wrk.format("POST", path, headers, '{"transactions":[' .. table.concat(items, ",") .. ']}')
end

local function note(status, body)
  if first_error == "" then
    first_error = status .. " " .. string.sub(body or "", 1, 300)
  end
end

function response(status, hdrs, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    note(status, body)
    return
  end
  if batch == 0 then
    if hdrs["Idempotent-Replayed"] or hdrs["idempotent-replayed"] then
      replays = replays + 1
      note(status, "replayed")
    else
      transfers_ok = transfers_ok + 1
    end
    return
  end
  local _, created = string.gsub(body, '"status":201', "")
  local _, replayed = string.gsub(body, '"replayed":true', "")
  transfers_ok = transfers_ok + created - replayed
  replays = replays + replayed
  if created < batch then
    failed_items = failed_items + batch - created
    note(status, body)
  end
end

function done(summary, latency, requests)
  local sums = {transfers_ok = 0, non2xx = 0, replays = 0, failed_items = 0}
  local sample = ""
  for _, thread in ipairs(threads) do
    for k, _ in pairs(sums) do
      sums[k] = sums[k] + thread:get(k)
    end
    if sample == "" then
      sample = thread:get("first_error")
    end
  end
  sample = string.gsub(string.gsub(string.gsub(sample, "%c", " "), "\\", "\\\\"), '"', '\\"')
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"max_us":%d,"transfers_ok":%d,"non2xx":%d,"replays":%d,"failed_items":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
      .. '"status_errors":%d,"first_error":"%s"}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, sums.transfers_ok, sums.non2xx, sums.replays,
    sums.failed_items, e.connect, e.read, e.write, e.timeout, e.status, sample))
end
