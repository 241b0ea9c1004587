#!/usr/bin/env python3
"""How much of what lazysnapd fetched during a cold start the container read.

Takes an eStargz OCI layout (as lazysnap-bench caches it), lazysnapd's debug log and its
access log (both from `lazysnap-bench --keep-logs DIR`) and prints, per fetch purpose,
the compressed bytes fetched and the part of them that belongs to chunks the container
read; where in a neighbour window the read bytes lie; and the link's use over time.

    bench/analysis/range_use.py LAYOUT LOG ACCESSED_JSON [--policy contiguous|same-dir|subtree|parent-subtree]

With --policy it also replays the neighbour fetches restricted to files in the missed
file's directory (or under it, or under its parent), within the same byte budget, and
prints what they would have fetched and how many read chunks no fetch would have
brought (each one a demand request more).

eStargz layouts only. It maps the access log to compressed chunks itself, as
lazysnap-bench's floor already does in Rust for every form (bench/src/cold/floor.rs:
layout_tocs, touched_ranges): moving this report into `lazysnap-bench --keep-logs` would
drop the copy.
"""
import bisect
import datetime
import gzip
import io
import json
import os
import re
import sys
import tarfile

RANGE = re.compile(r"(\w+)=(\S+)")


def load_layers(layout):
    index = json.load(open(os.path.join(layout, "index.json")))
    blob = lambda digest: os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])
    manifest = json.load(open(blob(index["manifests"][0]["digest"])))
    layers = {}
    for layer in manifest["layers"]:
        path = blob(layer["digest"])
        toc_digest = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        with open(path, "rb") as f:
            f.seek(-51, 2)
            toc_offset = int(re.search(rb"([0-9a-f]{16})STARGZ", f.read()).group(1), 16)
            f.seek(toc_offset)
            toc_gz = f.read(os.path.getsize(path) - 51 - toc_offset)
        toc = json.load(tarfile.open(fileobj=io.BytesIO(gzip.decompress(toc_gz))).extractfile("stargz.index.json"))
        chunks = sorted(
            (e["offset"], e["name"], e.get("chunkOffset", 0), e.get("chunkSize") or e.get("size", 0))
            for e in toc["entries"]
            if e["type"] in ("reg", "chunk") and e.get("offset")
        )
        starts = [c[0] for c in chunks]
        by_name = {}
        for i, c in enumerate(chunks):
            by_name.setdefault(c[1], []).append(i)
        # lazysnapd's log names a layer by its TOC digest, the access log by its digest.
        layers[layer["digest"]] = layers[toc_digest] = {
            "chunks": chunks, "starts": starts, "ends": starts[1:] + [toc_offset],
            "by_name": by_name, "read": set(), "key": toc_digest,
        }
    return layers


def mark_read(layers, accessed):
    for layer in json.load(open(accessed)):
        d = layers[layer["layer"]]
        for f in layer["files"]:
            for i in d["by_name"].get(f["path"], []):
                _, _, at, size = d["chunks"][i]
                size = size or f["size"]
                if any(a < at + max(size, 1) and b > at for a, b in f["ranges"]):
                    d["read"].add(i)


def fetches(log):
    for line in open(log):
        if "range fetched" not in line:
            continue
        kv = dict(RANGE.findall(line))
        end = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
        yield {"layer": kv["layer"], "start": int(kv["start"]), "len": int(kv["len"]),
               "purpose": kv["purpose"], "end": end, "begin": end - int(kv["ms"]) / 1000}


def chunks_in(d, start, end):
    i = max(bisect.bisect_right(d["starts"], start) - 1, 0)
    while i < len(d["starts"]) and d["starts"][i] < end:
        lo, hi = max(start, d["starts"][i]), min(end, d["ends"][i])
        if hi > lo:
            yield i, lo, hi
        i += 1


def union(intervals):
    total, cur = 0.0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            total += cur[1] - cur[0] if cur else 0
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur else 0)


def replay(layers, log, keep):
    """Neighbour fetches restricted by `keep(missed_dir, path)`, same byte budget each."""
    have, fetched, used = set(), 0, 0
    for r in fetches(log):
        d = layers[r["layer"]]
        if r["purpose"] != "Neighbour":
            have.update((d["key"], i) for i, _, _ in chunks_in(d, r["start"], r["start"] + r["len"]))
            continue
        j = bisect.bisect_left(d["ends"], r["start"])
        missed = d["chunks"][j][1] if j < len(d["ends"]) and d["ends"][j] == r["start"] else None
        got, i = 0, bisect.bisect_left(d["starts"], r["start"])
        while i < len(d["starts"]) and d["starts"][i] - r["start"] < r["len"] and got < r["len"]:
            path = d["chunks"][i][1]
            if (d["key"], i) not in have and (missed is None or keep(os.path.dirname(missed), path)):
                size = d["ends"][i] - d["starts"][i]
                have.add((d["key"], i))
                got += size
                fetched += size
                used += size if i in d["read"] else 0
            i += 1
    unique = {id(d): d for d in layers.values()}.values()
    never = sum(1 for d in unique for i in d["read"] if (d["key"], i) not in have)
    return fetched, used, never


POLICIES = {
    "contiguous": lambda dir_, p: True,  # what lazysnapd does: replays the log as it was
    "same-dir": lambda dir_, p: os.path.dirname(p) == dir_,
    "subtree": lambda dir_, p: p.startswith(dir_ + "/"),
    "parent-subtree": lambda dir_, p: p.startswith(os.path.dirname(dir_) + "/"),
}


def main():
    layout, log, accessed = sys.argv[1:4]
    layers = load_layers(layout)
    mark_read(layers, accessed)
    per, bins = {}, [0, 128 << 10, 256 << 10, 512 << 10, 768 << 10, 1 << 40]
    window = [[0, 0] for _ in bins[1:]]
    all_ranges = list(fetches(log))
    for r in all_ranges:
        d = layers[r["layer"]]
        p = per.setdefault(r["purpose"], [0, 0, 0])
        p[0] += 1
        p[1] += r["len"]
        for i, lo, hi in chunks_in(d, r["start"], r["start"] + r["len"]):
            read = i in d["read"]
            p[2] += (hi - lo) if read else 0
            if r["purpose"] == "Neighbour":
                for k in range(len(window)):
                    a, b = max(lo, r["start"] + bins[k]), min(hi, r["start"] + bins[k + 1])
                    if b > a:
                        window[k][0] += b - a
                        window[k][1] += (b - a) if read else 0
    print("purpose     requests  fetched MB  read MB  read %")
    for purpose, (n, fetched, used) in sorted(per.items()):
        print(f"{purpose:<11} {n:>8}  {fetched / 1e6:>10.1f}  {used / 1e6:>7.1f}  {100 * used / max(fetched, 1):>5.0f}")
    unique = {id(d): d for d in layers.values()}.values()
    touched = sum(d["ends"][i] - d["starts"][i] for d in unique for i in d["read"])
    print(f"chunks the container read: {touched / 1e6:.1f} MB compressed")
    print("neighbour window position  fetched MB  read %")
    for k, (fetched, used) in enumerate(window):
        hi = "end" if k == len(window) - 1 else f"{bins[k + 1] >> 10}K"
        print(f"  {bins[k] >> 10:>4}K-{hi:<5}            {fetched / 1e6:>8.1f}  {100 * used / max(fetched, 1):>5.0f}")
    demand = [r for r in all_ranges if r["purpose"] != "Background"]
    t0 = min(r["begin"] for r in demand)
    t1 = max(r["end"] for r in demand)
    busy = union([(r["begin"], r["end"]) for r in demand])
    moved = sum(r["len"] for r in demand)
    print(f"before the background fetch: {t1 - t0:.2f} s from the first range to the last, "
          f"a range in flight for {busy:.2f} s of it, {moved / 1e6:.1f} MB "
          f"({moved / 1e6 / (t1 - t0):.1f} MB/s over the span)")
    if len(sys.argv) > 5 and sys.argv[4] == "--policy":
        fetched, used, never = replay(layers, log, POLICIES[sys.argv[5]])
        print(f"neighbours as {sys.argv[5]}: fetched {fetched / 1e6:.1f} MB, read {used / 1e6:.1f} MB "
              f"({100 * used / max(fetched, 1):.0f}%); read chunks no fetch brought: {never}")


if __name__ == "__main__":
    main()
