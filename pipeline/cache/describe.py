"""A cache's manifest in human terms, for `lrc inspect-cache`: teacher, task or corpus, storage, splits, files."""

from __future__ import annotations

import numpy as np

from pipeline.cache.reader import Cache


def describe(cache: Cache) -> str:
    """The manifest in human terms, for `lrc inspect-cache`."""
    m = cache.manifest
    teacher, task, corpus = m["teacher"], m["task"], m.get("corpus")
    if task is not None:
        labels = f"{task['num_labels']} labels: {', '.join(task['labels'])}" if task["labels"] else "regression"
        what = f"task         {task['name']} ({labels}; metric {task['metric']})"
    else:  # a corpus cache for general distillation
        what = (f"corpus       {corpus['source']}: {corpus['passages']} passages in {corpus['windows']} windows "
                "(no labels, no logits: general distillation)")
    width, layers = m["hidden_size"], m["layers"]
    lines = [
        f"cache        {cache.path}",
        f"format       {m['format']} v{m['format_version']} (written by lrc {m['lrc_version']})",
        f"teacher      {m.get('teacher_path', '?')} ({teacher['config'].get('model_type', '?')}, "
        f"{teacher['num_layers']} layers x {teacher['hidden_size']}, weights sha256 {teacher['weights_sha256'][:12]})",
        what,
        f"layers       {layers} of {teacher['num_layers']}, stored as {m['hidden_dtype']}, width {width}",
        f"max length   {m['max_length']} tokens",
    ]
    bytes_per_value = np.dtype(m["hidden_dtype"]).itemsize
    if m.get("hidden_quant"):  # int8: name the scheme, and compare the size with what float16 would take
        q = m["hidden_quant"]
        lines.append(f"quantised    {q['scheme']}: {q['scale']} ({q['scale_dtype']} column {q['scale_column']}); "
                     f"pooled vectors {q['pooled_dtype']}")
        bytes_per_value = 2
    for name, info in m["splits"].items():
        split = cache.split(name)
        tokens = int(np.sum(split.column("input_ids").combine_chunks().value_lengths().to_numpy()))
        rows = max(info["rows"], 1)
        line = (f"{name:<5} {info['rows']} rows in {len(info['shards'])} shard(s), {info['bytes'] / 1e6:.1f} MB, "
                f"{info['bytes'] / rows / 1e3:.1f} KB/example, {tokens / rows:.1f} tokens/example")
        lines.append(("splits       " if name == next(iter(m["splits"])) else "             ") + line)
        if info["hidden"]:
            ideal = tokens * len(layers) * width * bytes_per_value
            what = " (float16)" if m.get("hidden_quant") else ""
            lines.append(f"             size vs tokens x layers x d' x {bytes_per_value}{what}: "
                         f"{info['bytes'] / max(ideal, 1):.3f}x")
    files = m["files"]
    if files:  # the tokenizer and teacher weights, checksummed like the shards
        tops = sorted({rel.split("/")[0] for rel in files})
        lines.append(f"files        {len(files)} in {', '.join(tops)}, "
                     f"{sum(e['bytes'] for e in files.values()) / 1e6:.1f} MB")
    scores = m.get("importance")
    lines.append(f"importance   {scores['file']}: channel, head and neuron scores over {scores['tokens']} train tokens, "
                 f"{scores['bytes'] / 1e3:.1f} KB, sha256 {scores['sha256'][:12]}" if scores else
                 "importance   none (an older lrc's cache): a narrower --init teacher keeps evenly spaced channels")
    total = sum(info["bytes"] for info in m["splits"].values())
    lines += [f"total        {total / 1e6:.1f} MB", f"fingerprint  {cache.fingerprint}"]
    return "\n".join(lines)
