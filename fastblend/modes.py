"""The blend modes and keyframe interpolation (FASTBLEND.md, "Modes"), streaming over frames.

Every runner takes `frames`, a callable i -> float32 (H, W, 3) tensor on the device (guide or style),
and a `match(tasks)` callable that runs one PatchMatch batch; it yields (index, float image) in
frame order so the caller can write each output and forget it. Only O(window) float frames are
alive at any time.
"""

from collections import defaultdict

import torch


def balanced(guide, style, n, window, batch, match):
    """out_t = mean of style_t and remap_{s->t}(style_s) for every other s in [t-W, t+W]. (The
    reference writes its running mean from before the last neighbour is added: a bug, not kept.)"""
    for t0 in range(0, n, batch):
        targets = range(t0, min(t0 + batch, n))
        tasks = [(s, t) for t in targets for s in range(max(t - window, 0), min(t + window + 1, n)) if s != t]
        acc = {t: style(t).clone() for t in targets}
        for i in range(0, len(tasks), batch):
            chunk = tasks[i : i + batch]
            out = match([(guide(s), guide(t), style(s)) for s, t in chunk])
            for (s, t), img in zip(chunk, out):
                acc[t] += img
        for t in targets:
            count = min(t + window + 1, n) - max(t - window, 0)
            yield t, acc.pop(t) / count


def tree_query(lo, hi):
    """Fenwick nodes (j, L) covering [lo, hi], from hi down: node (j, L) is frames j-2^L+1..j, the
    low L bits of j all 1, and L as large as fits inside [lo, hi]."""
    nodes, j = [], hi
    while j >= lo:
        level = 0
        while (j >> level) & 1 and j - (1 << (level + 1)) + 1 >= lo:
            level += 1
        nodes.append((j, level))
        j -= 1 << level
    return nodes


def fast_plan(n, window):
    """Per side ("l" on the frame list, "r" on the reversed list): each position's window query and
    the node levels each position must hold (only levels some query uses are built or kept)."""
    queries = [tree_query(max(k - window, 0), k) for k in range(n)]
    used = defaultdict(set)
    for nodes in queries:
        for k, level in nodes:
            used[k].add(level)
    return queries, used


def fast_match_count(n, window):
    queries, used = fast_plan(n, window)
    return 2 * (sum((1 << max(l)) - 1 for l in used.values()) + sum(len(q) - 1 for q in queries))


def fast(guide, style, n, window, batch, match):
    """Fenwick-tree blending. Node (k, L) = mean of frames at positions k-2^L+1..k, each remapped
    directly onto k; a window [t-W, t] is O(log W) nodes, each remapped onto t as ONE image and
    merged with weight 2^L; left side on the frame list, right side on the reversed list, merged as
    (w_l F_l - F_t + w_r F_r) / (w_l + w_r - 1). Instead of the reference's two whole-video tables
    (about 2N float frames), targets are processed in blocks in frame order and each node is built
    just before its first use and dropped after its last, so about 2(W + batch) nodes stay alive."""
    queries, used = fast_plan(n, window)
    top = {k: max(levels) for k, levels in used.items()}
    frame = {"l": lambda k: k, "r": lambda k: n - 1 - k}  # position -> frame index
    nodes = {}  # (side, position) -> {level: float image}
    for t0 in range(0, n, batch):
        targets = range(t0, min(t0 + batch, n))
        # 1. build the nodes this block needs: raw frames remapped straight onto the node's frame
        want = {(side, k) for t in targets for side, kt in (("l", t), ("r", n - 1 - t)) for k, _ in queries[kt]}
        new = sorted(key for key in want if key not in nodes)
        parts = {key: defaultdict(lambda: 0) for key in new}
        tasks = [(side, k, q) for side, k in new for q in range(k - (1 << top[k]) + 1, k)]
        for i in range(0, len(tasks), batch):
            chunk = tasks[i : i + batch]
            pairs = [(frame[s](q), frame[s](k)) for s, k, q in chunk]
            out = match([(guide(a), guide(b), style(a)) for a, b in pairs])
            for (s, k, q), img in zip(chunk, out):
                parts[(s, k)][(k - q).bit_length()] += img  # part l: distances 2^(l-1) .. 2^l - 1
        for s, k in new:
            total, levels = style(frame[s](k)).clone(), {}
            for level in range(top[k] + 1):
                total = total + parts[(s, k)][level] if level else total
                if level in used[k]:
                    levels[level] = total / (1 << level)
            nodes[(s, k)] = levels
        del parts
        # 2. window sums: every other node remapped onto the target as one image, weight 2^L
        acc, weight, tasks = {}, {}, []
        for t in targets:
            for side, kt in (("l", t), ("r", n - 1 - t)):
                (k0, l0), rest = queries[kt][0], queries[kt][1:]
                acc[(side, t)] = nodes[(side, k0)][l0] * (1 << l0)
                weight[(side, t)] = 1 << l0
                tasks += [(side, k, level, t) for k, level in rest]
        for i in range(0, len(tasks), batch):
            chunk = tasks[i : i + batch]
            out = match([(guide(frame[s](k)), guide(t), nodes[(s, k)][lv]) for s, k, lv, t in chunk])
            for (s, k, lv, t), img in zip(chunk, out):
                acc[(s, t)] += img * (1 << lv)
                weight[(s, t)] += 1 << lv
        for t in targets:
            wl, wr = weight[("l", t)], weight[("r", t)]
            yield t, (acc[("l", t)] - style(t) + acc[("r", t)]) / (wl + wr - 1)
        # 3. drop nodes no later target uses: left k serves t in [k, k+W], right frame i in [i-W, i]
        nxt = t0 + batch
        for key in [key for key in nodes if (key[1] + window < nxt if key[0] == "l" else n - 1 - key[1] < nxt)]:
            del nodes[key]


def accurate(guide, style, n, window, batch, match):
    """All window frames, the target included, matched jointly onto t in batch chunks with the
    mean remapped style of the chunk as the style target; out_t = mean of all remapped frames."""
    for t in range(n):
        lo, hi = max(t - window, 0), min(t + window + 1, n)
        acc = 0
        for i in range(lo, hi, batch):
            out = match([(guide(s), guide(t), style(s)) for s in range(i, min(i + batch, hi))])
            acc = acc + torch.stack(out).sum(0)
        yield t, acc / (hi - lo)


def interpolation_tasks(keys, n):
    """(l, m, r) per frame m: between keyframes l <= m < r, or the nearest keyframe twice outside."""
    keys = sorted(keys)
    tasks = [(keys[0], m, keys[0]) for m in range(keys[0])]
    for l, r in zip(keys[:-1], keys[1:]):
        tasks += [(l, m, r) for m in range(l, r)]
    return tasks + [(keys[-1], m, keys[-1]) for m in range(keys[-1], n)]


def interpolate(guide, key_style, keys, n, batch, match, match_single):
    """Each frame m between keyframes l < r is matched from both (pairwise style error) and blended
    with weights |m-r| / (|m-r| + |m-l|) and |m-l| / (|m-r| + |m-l|). One keyframe: every frame is
    matched from it alone (plain style cost)."""
    if len(keys) == 1:
        k = keys[0]
        for m0 in range(0, n, batch):
            ms = range(m0, min(m0 + batch, n))
            out = match_single([(guide(k), guide(m), key_style(k)) for m in ms])
            yield from zip(ms, out)
        return
    tasks = interpolation_tasks(keys, n)
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        items = []
        for l, m, r in chunk:  # pairs (l -> m, r -> m) at batch positions (2k, 2k+1)
            items += [(guide(l), guide(m), key_style(l)), (guide(r), guide(m), key_style(r))]
        out = match(items)
        for j, (l, m, r) in enumerate(chunk):
            wl, wr = abs(m - r), abs(m - l)
            wl, wr = (0.5, 0.5) if wl + wr == 0 else (wl / (wl + wr), wr / (wl + wr))
            yield m, out[2 * j] * wl + out[2 * j + 1] * wr
