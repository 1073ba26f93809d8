"""Statistics read from the optimized HLO text of a compiled program (``jit(f).lower(...).compile()
.as_text()``): what the compiler actually emitted, counted without running it.

- Collectives (``collectives``, ``collective_table``, ``collective_seconds``): kind, runs per program run
  and bytes per device of every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute,
  loop trip counts applied; the sharded decode step's communication (``docs/sharding.md``).
- The parser both use: ``parse_hlo`` (computations and their instructions) and ``execution_counts`` (runs
  of each computation per program run, from the call graph and the loops' known trip counts).
"""

from __future__ import annotations

import dataclasses
import re

# ==== Collectives: kind, count and bytes of a compiled program's collectives ============================
#
# Read from the optimized HLO text of a compiled program (``jit(f).lower(...).compile().as_text()``).
# A collective inside a while loop runs once per iteration: each computation's count of executions per run
# of the program comes from the call graph (a while body runs its ``known_trip_count`` times). An async
# collective (``all-reduce-start`` / ``-done``, or ``async-start`` wrapping one) is counted once.

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                    "ragged-all-to-all", "collective-broadcast")

# Bytes per element of the HLO element types (sub-byte types round up to a byte).
_ELEMENT_BYTES = {"pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                  "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                  "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def element_bytes(element_type: str) -> int:
    """Bytes of one element of an HLO element type (``f32``, ``bf16``, ``f8e4m3fn``, ...)."""
    if element_type.startswith("f8") or element_type.startswith("f4") or element_type.startswith("f6"):
        return 1
    if element_type not in _ELEMENT_BYTES:
        raise ValueError(f"unknown HLO element type {element_type!r}")
    return _ELEMENT_BYTES[element_type]


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array (``f32[4,64]{1,0}``) or a tuple of them (summed); ``token[]``
    and other non-array shapes count 0."""
    total = 0
    for element_type, dims in _ARRAY.findall(shape):
        if element_type == "token":
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * element_bytes(element_type)
    return total


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO: {text[start:start + 120]!r}")


@dataclasses.dataclass(frozen=True)
class HloInstruction:
    """One instruction of an HLO computation: ``name``, result ``shape`` text, ``opcode``, ``operands`` (the
    raw text between the parentheses) and ``attributes`` (the rest of the line)."""

    name: str
    shape: str
    opcode: str
    operands: str
    attributes: str

    def operand_shapes(self, shapes: dict[str, str]) -> list[str]:
        """The shape of each operand: printed with it (``f32[8]{0} %x``), else that of the instruction or
        parameter it names in ``shapes``."""
        out, depth, start = [], 0, 0
        tokens = []
        for i, c in enumerate(self.operands + ","):
            depth += c in "([{"
            depth -= c in ")]}"
            if c == "," and depth == 0:
                tokens.append(self.operands[start:i].strip())
                start = i + 1
        for token in filter(None, tokens):
            name = token.split()[-1].lstrip("%")
            if _ARRAY.search(token):
                out.append(token)
            elif name in shapes:
                out.append(shapes[name])
            else:
                raise ValueError(f"HLO instruction {self.name}: operand {token!r} has no known shape")
        return out


def _parse_instruction(line: str) -> HloInstruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    name, rest = m.groups()
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    m = re.match(r"([a-z][\w\-]*)\(", rest)
    if not m:
        return None
    end = _matching(rest, m.end() - 1)
    return HloInstruction(name.lstrip("%"), shape, m.group(1), rest[m.end():end - 1], rest[end:])


def parse_hlo(text: str) -> tuple[dict[str, list[HloInstruction]], str]:
    """The computations of an HLO module's text, ``{name: [instructions]}``, and the entry computation's
    name."""
    computations: dict[str, list[HloInstruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith("HloModule"):
                current = m.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            instruction = _parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _callees(instruction: HloInstruction) -> list[tuple[str, int | None]]:
    """(computation, runs per run of ``instruction``; None for an unknown loop trip count)."""
    if instruction.opcode in ("async-done", "async-update"):
        return []  # the same computation as its async-start: counted there
    trip = None
    if instruction.opcode == "while":
        m = _TRIP_COUNT.search(instruction.attributes)
        trip = int(m.group(1)) if m else None
    out = []
    for key, name in _CALLED.findall(instruction.attributes):
        if instruction.opcode == "while" and key in ("body", "condition"):
            out.append((name, None if trip is None else trip + (key == "condition")))
        else:
            out.append((name, 1))
    for names in _CALLED_LISTS.findall(instruction.attributes):
        out += [(n.strip().lstrip("%"), 1) for n in names.split(",") if n.strip()]
    return out


def execution_counts(computations: dict[str, list[HloInstruction]], entry: str) -> dict[str, tuple[int, bool]]:
    """Runs of each computation per run of ``entry``, and whether every loop on the way had a known trip
    count (an unknown one counts once). A computation called from several places sums its callers' runs;
    each branch of a conditional counts as taken."""
    callers: dict[str, list[tuple[str, int | None]]] = {}
    for caller, instructions in computations.items():
        for instruction in instructions:
            for callee, times in _callees(instruction):
                callers.setdefault(callee, []).append((caller, times))
    memo: dict[str, tuple[int, bool]] = {entry: (1, True)}

    def count(name: str, seen: frozenset = frozenset()) -> tuple[int, bool]:
        if name in memo:
            return memo[name]
        if name in seen:
            raise ValueError(f"HLO computation {name!r} calls itself")
        total, known = 0, True
        for caller, times in callers.get(name, []):
            n, k = count(caller, seen | {name})
            total += n * (1 if times is None else times)
            known = known and k and times is not None
        memo[name] = (total, known)
        return memo[name]

    return {name: count(name) for name in computations}


def _group_size(attributes: str, devices: int) -> int:
    """Devices in each replica group of a collective: ``{{0,1},{2,3}}``, the iota form ``[2,4]<=[8]``, or
    ``mesh[...] ... {axes}`` (the product of the named mesh axes); all ``devices`` when there are none."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
    if m:
        sizes = {k.strip("'\" "): int(v) for k, v in re.findall(r"([^,=]+)=(\d+)", m.group(1))}
        size = 1
        for axis in filter(None, (a.strip("'\" ") for a in m.group(2).split(","))):
            size *= sizes[axis]
        return size
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if m:
        return len([d for d in m.group(1).split(",") if d.strip()])
    if re.search(r"replica_groups=\{\}", attributes) or "replica_groups" not in attributes:
        return devices
    raise ValueError(f"unrecognised replica_groups in {attributes[:200]!r}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program, per device.

    ``count``: runs per run of the program (loop trip counts applied; ``count_exact`` False when a loop on
    the way had no known trip count). ``bytes``: the full buffer of one run on one device: the reduced
    buffer of an all-reduce, the gathered result of an all-gather, the input of a reduce-scatter, the
    buffer exchanged by an all-to-all (a ragged one: its input buffer), sent by a collective-permute or
    broadcast by a collective-broadcast. ``group``: devices per replica group."""

    kind: str
    name: str
    computation: str
    dtype: str
    bytes: int
    group: int
    count: int
    count_exact: bool = True

    @property
    def bus_bytes(self) -> float:
        """Bytes each device sends over its link per run, by the ring algorithms (NCCL's "bus bandwidth"
        convention): 2(n-1)/n of the buffer for an all-reduce, (n-1)/n for all-gather, reduce-scatter and
        the all-to-alls, the whole buffer for a collective-permute and a collective-broadcast."""
        n = self.group
        if self.kind in ("collective-permute", "collective-broadcast"):
            return float(self.bytes)
        factor = 2 * (n - 1) / n if self.kind == "all-reduce" else (n - 1) / n
        return factor * self.bytes


def collectives(hlo_text: str, devices: int | None = None) -> list[Collective]:
    """The collectives of an optimized HLO module's text (``compiled.as_text()``), one entry per
    instruction; ``devices`` (default: the module's ``num_partitions``) is the group of a collective
    without replica groups."""
    if devices is None:
        m = re.search(r"\bnum_partitions=(\d+)", hlo_text)
        devices = int(m.group(1)) if m else 1
    computations, entry = parse_hlo(hlo_text)
    counts = execution_counts(computations, entry)
    shapes = {i.name: i.shape for instructions in computations.values() for i in instructions}
    out = []
    for computation, instructions in computations.items():
        runs, exact = counts[computation]
        for inst in instructions:
            kind = inst.opcode.removesuffix("-start")
            if kind not in COLLECTIVE_KINDS or inst.opcode.endswith("-done"):
                continue
            operand_shapes = inst.operand_shapes(shapes)
            if kind in ("collective-permute", "ragged-all-to-all"):
                operand_shapes = operand_shapes[:1]  # the others: output buffer, offsets and sizes
            nbytes = sum(shape_bytes(s) for s in operand_shapes)
            group = 2 if kind == "collective-permute" else _group_size(inst.attributes, devices)
            if kind == "all-gather":
                nbytes *= group
            types = sorted({t for s in operand_shapes for t, _ in _ARRAY.findall(s)})
            out.append(Collective(kind, inst.name, computation, ",".join(types), nbytes, group, runs, exact))
    return out


def collective_table(items: list[Collective]) -> list[dict]:
    """``collectives`` summed by (kind, group, dtype): ``count`` (runs per program run), ``bytes`` and
    ``bus_bytes`` (summed over the runs, per device), ``instructions``."""
    rows: dict[tuple, dict] = {}
    for c in items:
        row = rows.setdefault((c.kind, c.group, c.dtype), {
            "kind": c.kind, "group": c.group, "dtype": c.dtype, "instructions": 0, "count": 0, "bytes": 0,
            "bus_bytes": 0.0, "count_exact": True})
        row["instructions"] += 1
        row["count"] += c.count
        row["bytes"] += c.count * c.bytes
        row["bus_bytes"] += c.count * c.bus_bytes
        row["count_exact"] = row["count_exact"] and c.count_exact
    return sorted(rows.values(), key=lambda r: (COLLECTIVE_KINDS.index(r["kind"]), r["group"], r["dtype"]))


def collective_seconds(items: list[Collective], bandwidth: float, latency: float = 0.0) -> float:
    """Seconds the collectives of one program run take on links of ``bandwidth`` bytes/s per device and
    direction, plus ``latency`` seconds per run of each collective (no overlap with compute assumed)."""
    return sum(c.count * (c.bus_bytes / bandwidth + latency) for c in items)


# ==== Kernels: what runs per program run, by kind; materialized copies of given arrays ===================
#
# A "kernel" is an instruction of a computation the program executes as a sequence of ops (the entry, loop
# bodies and conditions, conditional branches, called and async computations): a fusion, a custom call
# (cuBLAS, a Pallas kernel), or an unfused op. Fusion bodies and reducers are not kernels. Counts are per
# run of the program, loop trip counts applied (``execution_counts``).

NOT_KERNELS = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
                         "add-dependency", "opt-barrier", "partition-id", "replica-id", "while", "conditional",
                         "call", "async-done", "async-update", "copy-done", "send-done", "recv-done",
                         "domain"})
_CONTROL_FLOW = ("while", "conditional", "call", "async-start")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel-launching instruction: ``opcode`` (``fusion`` kinds as ``fusion:kLoop`` etc.), its
    ``name``, ``computation``, result ``shape`` text and ``bytes``, ``op_name`` (the JAX name stack of its
    metadata: which module it came from; empty where the compiler dropped it, e.g. CPU dots), ``count``
    (runs per program run) and ``operand_shapes`` (the shape texts of its operands)."""

    opcode: str
    name: str
    computation: str
    shape: str
    bytes: int
    op_name: str
    count: int
    count_exact: bool = True
    operand_shapes: tuple[str, ...] = ()

    @property
    def dims(self) -> tuple[int, ...] | None:
        """The dimensions of an array result (None for a tuple)."""
        arrays = _ARRAY.findall(self.shape)
        if self.shape.startswith("(") or len(arrays) != 1:
            return None
        return tuple(int(d) for d in arrays[0][1].split(",") if d)


def _scheduled(computations: dict[str, list[HloInstruction]], entry: str) -> set[str]:
    """The computations run as sequences of kernels: the entry and what its control flow calls."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for inst in computations[name]:
            if inst.opcode in _CONTROL_FLOW:
                todo += [callee for callee, _ in _callees(inst)]
    return seen


def kernels(hlo_text: str) -> list[Kernel]:
    """Every kernel of an optimized HLO module's text (``compiled.as_text()``), with its runs per program
    run."""
    computations, entry = parse_hlo(hlo_text)
    counts = execution_counts(computations, entry)
    out = []
    for computation in _scheduled(computations, entry):
        runs, exact = counts[computation]
        shapes = {i.name: i.shape for i in computations[computation]}
        for inst in computations[computation]:
            if inst.opcode in NOT_KERNELS or (inst.opcode.endswith("-done") and inst.opcode != "copy"):
                continue
            opcode = inst.opcode
            if opcode == "fusion":
                m = re.search(r"\bkind=(k\w+)", inst.attributes)
                opcode = f"fusion:{m.group(1)}" if m else opcode
            m = _OP_NAME.search(inst.attributes)
            operands = tuple(shapes.get(n, "") for n in re.findall(r"%([\w.\-]+)", inst.operands))
            out.append(Kernel(opcode, inst.name, computation, inst.shape, shape_bytes(inst.shape),
                              m.group(1) if m else "", runs, exact, operands))
    return out


def kernel_counts(items: list[Kernel], key=lambda k: k.opcode) -> dict[str, int]:
    """Runs per program run, summed by ``key(kernel)`` (default: the opcode), most first; ``"total"`` too."""
    counts: dict[str, int] = {}
    for k in items:
        counts[key(k)] = counts.get(key(k), 0) + k.count
    out = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    out["total"] = sum(k.count for k in items)
    return out


def materialized(items: list[Kernel], shapes) -> list[Kernel]:
    """The kernels whose result is an array of one of ``shapes`` (tuples of dims): a buffer of that shape
    written on every run, e.g. a copy or a dynamic slice of a whole stacked weight."""
    wanted = {tuple(s) for s in shapes}
    return [k for k in items if k.dims in wanted and not k.opcode.startswith("custom-call")]


# The parts of a Jamba step, from the module path in a kernel's op_name (first match wins).
JAMBA_KINDS = (
    ("attention", r"/self_attn/"),
    ("mamba in_proj", r"/mamba/in_proj/"),
    ("mamba out_proj", r"/mamba/out_proj/"),
    ("mamba x_proj/dt", r"/mamba/(x_proj|dt_proj|dt_layernorm|b_layernorm|c_layernorm)/"),
    ("mamba state update", r"/mamba/.*(while|scan|selective)"),
    ("mamba conv + gating", r"/mamba/"),
    ("router", r"/feed_forward/router\b"),
    ("experts", r"/feed_forward/experts\b"),
    ("dense mlp", r"/feed_forward/(gate_proj|up_proj|down_proj)/"),
    ("moe other", r"/feed_forward/"),
    ("norms", r"layernorm/"),
    ("lm head", r"/lm_head/"),
    ("embedding", r"/embed_tokens/"),
)


def _dims(shape: str) -> tuple[int, ...] | None:
    arrays = _ARRAY.findall(shape)
    return tuple(int(d) for d in arrays[0][1].split(",") if d) if len(arrays) == 1 else None


def weight_kinds(params) -> dict[tuple[int, ...], str]:
    """``{shape: kind}`` of a Jamba params tree's matrices as a block sees them (stacked leaves without
    their block axis, expert stacks also per expert), the kind from ``JAMBA_KINDS`` by the leaf's path;
    shapes two kinds share map to both (``"attention | experts"``). Names kernels that lost their op_name
    by their weight operand (``jamba_kind``)."""
    from flax import traverse_util

    kinds: dict[tuple[int, ...], set] = {}
    leaves = traverse_util.flatten_dict(params, is_leaf=lambda _, x: hasattr(x, "q"))
    for path, leaf in leaves.items():
        arrays = [leaf.q] if hasattr(leaf, "q") else [leaf]
        shape = tuple(arrays[0].shape)
        shape = shape[1:] if path[0] == "blocks" else shape
        name = "/" + "/".join(str(p) for p in path) + "/"
        kind = next((k for k, pattern in JAMBA_KINDS if re.search(pattern, name)), None)
        if kind is None or len(shape) < 2:
            continue
        for s in {shape, shape[1:]} if len(shape) == 3 else {shape}:
            kinds.setdefault(s, set()).add(kind)
    return {s: " | ".join(sorted(k)) for s, k in kinds.items()}


def jamba_kind(kernel: Kernel, weights: dict[tuple[int, ...], str] | None = None) -> str:
    """The part of a Jamba step a kernel belongs to (``JAMBA_KINDS``); a kernel without an op_name by its
    weight operand's shape in ``weights`` (``weight_kinds``); ``"copies"`` for copies and slices outside
    every module, ``"other"`` (sampling, the decode loop's bookkeeping) for the rest."""
    name = kernel.op_name + "/"
    for kind, pattern in JAMBA_KINDS:
        if re.search(pattern, name):
            return kind
    if not kernel.op_name and weights:
        for shape in kernel.operand_shapes:
            if _dims(shape) in weights:
                return weights[_dims(shape)]
    if kernel.opcode in ("copy", "copy-start", "dynamic-slice", "dynamic-update-slice", "slice") or \
            re.search(r"dynamic_(update_)?(index_in_dim|slice)", name):
        return "copies"
    return "other"
