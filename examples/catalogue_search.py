"""GET /v1/items (catalogue search) on 50,000 items: loads them through
POST /v1/items into a running recd (its URL is the first argument), then
times each search 20 times. See docs/benchmarks.md#catalogue-search."""
import json, sys, time, urllib.request
base = sys.argv[1]
def post(path, body):
    r = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return urllib.request.urlopen(r).read()
cats = ["shoes","jackets","shirts","bags","hats","books","games","kitchen","toys","garden"]
for b in range(50):
    items = [{"item_id": f"item-{b*1000+i:05d}", "title": f"{cats[(b*1000+i)%10].title()} model {b*1000+i}",
              "categories": [cats[(b*1000+i)%10]]} for i in range(1000)]
    post("/v1/items", {"items": items})
def t(path, n=20):
    urllib.request.urlopen(base + path).read()
    xs = []
    for _ in range(n):
        s = time.perf_counter(); body = urllib.request.urlopen(base + path).read(); xs.append(time.perf_counter() - s)
    xs.sort()
    print(f"{path:55s} median {xs[len(xs)//2]*1000:7.1f} ms  max {xs[-1]*1000:7.1f} ms  items {len(json.loads(body)['items'])}")
for p in ["/v1/items?limit=100", "/v1/items?q=item-4&limit=100", "/v1/items?q=shoes&limit=100",
          "/v1/items?category=toys&limit=100", "/v1/items?q=model 4999&limit=100", "/v1/items?q=nothing-matches&limit=100",
          "/v1/items?category=toys&q=model 12&limit=100"]:
    t(p.replace(" ", "%20"))
