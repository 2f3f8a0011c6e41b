/*
 * Compiled replay of MXNet 1.9's static memory planner for one mirror set.
 *
 * The same computation as AllocatorModel._planned_bytes_python in allocator.py
 * (NOTE [ replaying MXNet's memory plan ] there): the executed graph of a
 * mirror set (copies of the mirrored forward nodes, their backward nodes moved
 * onto the copies), nnvm's post-order walk from the gradient outputs, the
 * reference counts, then nnvm's greedy PlanMemory walk.  The Python version is
 * the specification; tests/core/test_allocator.py checks both give the
 * same figure on every graph and mirror set they try.  This file only makes
 * the planner's search about 30x faster; the package works without it.
 *
 * The model is handed over once as flat int64 arrays (prepare), then every
 * evaluation passes the mirrored nodes' keys (names, or name#k for repeated names) and a dict
 * of their forward ids.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

enum { INPUT_START, INPUT_NODE, INPUT_OUTPUT, OUTPUT_START, ENTRY_SIZE, DEP_START, DEPS, BDEP_START, BDEPS,
       OWNED_START, OWNED, REFERENCES, GRADIENT_FLAGS, OP_KIND, ROOTS, NUM_ARRAYS };

/* OP_KIND bits: 1 in-place (0, 0); 2 in-place (0, 0) and (1, 0); 4 identity. */
#define KIND_ONE 1
#define KIND_TWO 2
#define KIND_IDENTITY 4

typedef struct {
    i64 num_nodes, num_forward, num_entries, match_range, max_outputs;
    i64 *a[NUM_ARRAYS];
    Py_ssize_t len[NUM_ARRAYS];
} Model;

static void model_free(PyObject *capsule) {
    Model *m = (Model *)PyCapsule_GetPointer(capsule, "mirror_replay_model");
    if (!m) return;
    for (int i = 0; i < NUM_ARRAYS; i++) free(m->a[i]);
    free(m);
}

static int csr_valid(const Model *m, int start, int values, i64 rows, i64 low, i64 high) {
    const i64 *starts = m->a[start];
    if (m->len[start] != rows + 1 || starts[0] != 0 || starts[rows] != m->len[values]) return 0;
    for (i64 r = 0; r < rows; r++)
        if (starts[r + 1] < starts[r]) return 0;
    for (Py_ssize_t j = 0; j < m->len[values]; j++)
        if (m->a[values][j] < low || m->a[values][j] >= high) return 0;
    return 1;
}

/* Every index the walk follows is in range, so replay() never reads outside its arrays
   (the caller falls back to the Python walk when this fails).  Also finds the widest operator,
   which sizes the per-operator output buffer: no fixed limit on outputs or inputs. */
static int model_valid(Model *m) {
    const i64 N = m->num_nodes, F = m->num_forward, E = m->num_entries;
    const i64 *out_start = m->a[OUTPUT_START], *in_start = m->a[INPUT_START];
    if (F < 0 || m->match_range < 0 || out_start[0] != 0 || out_start[N] != E) return 0;
    m->max_outputs = 0;
    for (i64 v = 0; v < N; v++) {
        if (out_start[v + 1] < out_start[v]) return 0;
        if (out_start[v + 1] - out_start[v] > m->max_outputs) m->max_outputs = out_start[v + 1] - out_start[v];
    }
    if (!csr_valid(m, INPUT_START, INPUT_NODE, N, -1, N) || m->len[INPUT_OUTPUT] != m->len[INPUT_NODE] ||
        !csr_valid(m, DEP_START, DEPS, N, 0, N) || !csr_valid(m, BDEP_START, BDEPS, N, F, N) ||
        !csr_valid(m, OWNED_START, OWNED, F, F, N))
        return 0;
    for (i64 v = 0; v < N; v++)
        for (i64 j = in_start[v]; j < in_start[v + 1]; j++) {
            i64 s = m->a[INPUT_NODE][j], k = m->a[INPUT_OUTPUT][j];
            if ((v < F && s >= F) || (s >= 0 && (k < 0 || k >= out_start[s + 1] - out_start[s]))) return 0;
        }
    for (Py_ssize_t r = 0; r < m->len[ROOTS]; r++)
        if (m->a[ROOTS][r] < 0 || m->a[ROOTS][r] >= N) return 0;
    for (i64 e = 0; e < E; e++)
        if (m->a[ENTRY_SIZE][e] < 0) return 0;
    return 1;
}

static PyObject *prepare(PyObject *self, PyObject *args) {
    long long num_forward, match_range;
    PyObject *arrays;
    if (!PyArg_ParseTuple(args, "LLO!", &num_forward, &match_range, &PyTuple_Type, &arrays)) return NULL;
    if (PyTuple_GET_SIZE(arrays) != NUM_ARRAYS) {
        PyErr_Format(PyExc_ValueError, "prepare() wants %d arrays", NUM_ARRAYS);
        return NULL;
    }
    Model *m = (Model *)calloc(1, sizeof(Model));
    if (!m) return PyErr_NoMemory();
    for (int i = 0; i < NUM_ARRAYS; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(arrays, i), &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        if (view.itemsize != 8 || !view.format || (strcmp(view.format, "q") != 0 && strcmp(view.format, "l") != 0)) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_TypeError, "prepare() wants int64 arrays (array('q'))");
            goto fail;
        }
        m->len[i] = view.len / 8;
        m->a[i] = (i64 *)malloc(view.len > 0 ? (size_t)view.len : 8);
        if (!m->a[i]) { PyBuffer_Release(&view); PyErr_NoMemory(); goto fail; }
        memcpy(m->a[i], view.buf, (size_t)view.len);
        PyBuffer_Release(&view);
    }
    m->num_forward = num_forward;
    m->match_range = match_range;
    m->num_nodes = m->len[INPUT_START] - 1;
    m->num_entries = m->len[ENTRY_SIZE];
    if (m->num_nodes < num_forward || m->len[OUTPUT_START] != m->num_nodes + 1 ||
        m->len[OWNED_START] != num_forward + 1 || m->len[OP_KIND] != m->num_nodes ||
        m->len[REFERENCES] != m->num_entries || m->len[GRADIENT_FLAGS] != m->num_entries) {
        PyErr_SetString(PyExc_ValueError, "inconsistent replay arrays");
        goto fail;
    }
    if (!model_valid(m)) {
        PyErr_SetString(PyExc_ValueError, "replay arrays refer to missing nodes or entries");
        goto fail;
    }
    PyObject *capsule = PyCapsule_New(m, "mirror_replay_model", model_free);
    if (!capsule) goto fail;
    return capsule;
fail:
    for (int i = 0; i < NUM_ARRAYS; i++) free(m->a[i]);
    free(m);
    return NULL;
}

/* The free list: (size, block) pairs sorted as Python sorts tuples. */
typedef struct { i64 size, block; } Free;

static int free_less(i64 s1, i64 b1, i64 s2, i64 b2) { return s1 < s2 || (s1 == s2 && b1 < b2); }

typedef struct {
    Free *items;
    i64 count, capacity;
} FreeList;

static int free_insert(FreeList *f, i64 size, i64 block) {  /* bisect.insort (right) */
    if (f->count == f->capacity) {
        i64 capacity = f->capacity ? 2 * f->capacity : 64;
        Free *items = (Free *)realloc(f->items, (size_t)capacity * sizeof(Free));
        if (!items) return -1;
        f->items = items;
        f->capacity = capacity;
    }
    i64 lo = 0, hi = f->count;
    while (lo < hi) {
        i64 mid = (lo + hi) / 2;
        if (free_less(size, block, f->items[mid].size, f->items[mid].block)) hi = mid; else lo = mid + 1;
    }
    memmove(f->items + lo + 1, f->items + lo, (size_t)(f->count - lo) * sizeof(Free));
    f->items[lo].size = size;
    f->items[lo].block = block;
    f->count++;
    return 0;
}

static i64 free_pop(FreeList *f, i64 position) {
    i64 block = f->items[position].block;
    memmove(f->items + position, f->items + position + 1, (size_t)(f->count - position - 1) * sizeof(Free));
    f->count--;
    return block;
}

/* An output waiting for a block: its size and its index on the operator. */
typedef struct { i64 size, output; } Wanted;

/* Largest first, ties: the later output first (Python's sorted(..., reverse=True)). */
static int wanted_before(const void *a, const void *b) {
    const Wanted *x = (const Wanted *)a, *y = (const Wanted *)b;
    if (x->size != y->size) return x->size > y->size ? -1 : 1;
    return (x->output < y->output) - (x->output > y->output);
}

/* Working memory of one evaluation, all freed at the end. */
typedef struct {
    i64 *remap, *override, *ov_in, *ov_in_node, *ov_in_out, *ov_dep, *ov_deps;
    i64 *order, *stack_node, *stack_pos;
    unsigned char *seen;
    i64 *offset, *copy_of, *references, *entries_arena, *entries_start, *storage;
    i64 *block_size, *block_refs, *sizes, *overridden_nodes, *entries_buffer;
    Wanted *wanted;
    FreeList free_list;
} Work;

static void work_free(Work *w) {
    void **p[] = {(void **)&w->remap, (void **)&w->override, (void **)&w->ov_in, (void **)&w->ov_in_node,
                  (void **)&w->ov_in_out, (void **)&w->ov_dep, (void **)&w->ov_deps, (void **)&w->order,
                  (void **)&w->stack_node, (void **)&w->stack_pos, (void **)&w->seen, (void **)&w->offset,
                  (void **)&w->copy_of, (void **)&w->references, (void **)&w->entries_arena,
                  (void **)&w->entries_start, (void **)&w->storage, (void **)&w->block_size,
                  (void **)&w->block_refs, (void **)&w->sizes, (void **)&w->overridden_nodes,
                  (void **)&w->entries_buffer, (void **)&w->wanted, (void **)&w->free_list.items};
    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++) { free(*p[i]); *p[i] = NULL; }
}

#define ALLOC(ptr, n) do { (ptr) = calloc((size_t)((n) > 0 ? (n) : 1), sizeof(*(ptr))); if (!(ptr)) goto nomem; } while (0)

#define REPLAY_NO_MEMORY (-1)

/* Returns the planned bytes, or a negative REPLAY_* code.  Runs without the GIL: no Python calls. */
static i64 replay(const Model *m, const i64 *copies, i64 num_copies, i64 limit) {
    const i64 N = m->num_nodes, F = m->num_forward, E = m->num_entries, M = N + num_copies;
    const i64 *in_start = m->a[INPUT_START], *in_node = m->a[INPUT_NODE], *in_out = m->a[INPUT_OUTPUT];
    const i64 *out_start = m->a[OUTPUT_START], *entry_size = m->a[ENTRY_SIZE];
    const i64 *dep_start = m->a[DEP_START], *deps = m->a[DEPS];
    const i64 *bdep_start = m->a[BDEP_START], *bdeps = m->a[BDEPS];
    const i64 *owned_start = m->a[OWNED_START], *owned = m->a[OWNED];
    const i64 *base_refs = m->a[REFERENCES], *gradient_flags = m->a[GRADIENT_FLAGS];
    const i64 *op_kind = m->a[OP_KIND], *roots = m->a[ROOTS];
    const i64 num_roots = m->len[ROOTS];
    Work w;
    memset(&w, 0, sizeof(w));
    i64 result = 0;

    /* Overrides: the copies' inputs and walk dependencies, and those of the backward nodes
       of mirrored nodes (AllocatorModel._overrides with full=False). */
    ALLOC(w.remap, F);
    for (i64 f = 0; f < F; f++) w.remap[f] = f;
    for (i64 i = 0; i < num_copies; i++) w.remap[copies[i]] = N + i;
    i64 overridden = num_copies, ov_inputs = 0, ov_deps = 0;
    for (i64 i = 0; i < num_copies; i++) {
        i64 f = copies[i];
        ov_inputs += in_start[f + 1] - in_start[f];
        for (i64 j = owned_start[f]; j < owned_start[f + 1]; j++) {
            i64 b = owned[j];
            overridden++;
            ov_inputs += in_start[b + 1] - in_start[b];
            ov_deps += dep_start[b + 1] - dep_start[b];
        }
    }
    ov_deps += ov_inputs;
    ALLOC(w.override, M);
    for (i64 v = 0; v < M; v++) w.override[v] = -1;
    ALLOC(w.ov_in, overridden + 1);
    ALLOC(w.ov_in_node, ov_inputs);
    ALLOC(w.ov_in_out, ov_inputs);
    ALLOC(w.ov_dep, overridden + 1);
    ALLOC(w.ov_deps, ov_deps);
    ALLOC(w.overridden_nodes, overridden);
    i64 *overridden_nodes = w.overridden_nodes;
    i64 count = 0, ni = 0, nd = 0;
    for (i64 i = 0; i < num_copies; i++) {
        i64 f = copies[i], v = N + i;
        w.override[v] = count;
        overridden_nodes[count] = v;
        w.ov_in[count] = ni;
        w.ov_dep[count] = nd;
        for (i64 j = in_start[f]; j < in_start[f + 1]; j++) {
            i64 s = in_node[j] >= 0 ? w.remap[in_node[j]] : in_node[j];
            w.ov_in_node[ni] = s;
            w.ov_in_out[ni++] = in_out[j];
            if (s >= F) w.ov_deps[nd++] = s;
        }
        count++;
        for (i64 o = owned_start[f]; o < owned_start[f + 1]; o++) {
            i64 b = owned[o];
            w.override[b] = count;
            overridden_nodes[count] = b;
            w.ov_in[count] = ni;
            w.ov_dep[count] = nd;
            for (i64 j = in_start[b]; j < in_start[b + 1]; j++) {
                i64 s = in_node[j];
                if (s >= 0 && s < F) s = w.remap[s];
                w.ov_in_node[ni] = s;
                w.ov_in_out[ni++] = in_out[j];
                if (s >= F) w.ov_deps[nd++] = s;
            }
            for (i64 j = dep_start[b]; j < dep_start[b + 1]; j++) {
                i64 d = deps[j] < F ? w.remap[deps[j]] : deps[j];
                if (d >= F) w.ov_deps[nd++] = d;
            }
            count++;
        }
    }
    w.ov_in[count] = ni;
    w.ov_dep[count] = nd;

    /* nnvm's post-order walk from the gradient outputs; the forward pass comes first. */
    ALLOC(w.seen, M);
    ALLOC(w.order, M);
    ALLOC(w.stack_node, M);
    ALLOC(w.stack_pos, M);
    i64 length = 0;
    for (i64 v = 0; v < F; v++) { w.seen[v] = 1; w.order[length++] = v; }
    for (i64 r = 0; r < num_roots; r++) {
        i64 root = roots[r];
        if (w.seen[root]) continue;
        w.seen[root] = 1;
        i64 top = 0;
        w.stack_node[0] = root;
        w.stack_pos[0] = 0;
        while (top >= 0) {
            i64 u = w.stack_node[top], o = w.override[u];
            const i64 *pending = o >= 0 ? w.ov_deps + w.ov_dep[o] : bdeps + bdep_start[u];
            i64 size = o >= 0 ? w.ov_dep[o + 1] - w.ov_dep[o] : bdep_start[u + 1] - bdep_start[u];
            i64 position = w.stack_pos[top];
            while (position < size && w.seen[pending[position]]) position++;
            if (position < size) {
                i64 next = pending[position];
                w.stack_pos[top] = position + 1;
                w.seen[next] = 1;
                top++;
                w.stack_node[top] = next;
                w.stack_pos[top] = 0;
            } else {
                w.order[length++] = u;
                top--;
            }
        }
    }

    /* Entries: node v's output k is offset[v] + k; copies' entries follow the graph's. */
    ALLOC(w.offset, M + 1);
    ALLOC(w.copy_of, M);
    for (i64 v = 0; v < N; v++) { w.offset[v] = out_start[v]; w.copy_of[v] = v; }
    i64 total = E;
    for (i64 i = 0; i < num_copies; i++) {
        i64 f = copies[i];
        w.offset[N + i] = total;
        w.copy_of[N + i] = f;
        total += out_start[f + 1] - out_start[f];
    }
    ALLOC(w.sizes, total);
    memcpy(w.sizes, entry_size, (size_t)E * sizeof(i64));
    for (i64 i = 0; i < num_copies; i++) {
        i64 f = copies[i];
        memcpy(w.sizes + w.offset[N + i], entry_size + out_start[f],
               (size_t)(out_start[f + 1] - out_start[f]) * sizeof(i64));
    }
    ALLOC(w.references, total);
    memcpy(w.references, base_refs, (size_t)E * sizeof(i64));
    /* Overridden nodes' entries (-1 for variables) and reference corrections. */
    ALLOC(w.entries_arena, ni);
    ALLOC(w.entries_start, count + 1);
    for (i64 c = 0; c < count; c++) {
        i64 v = overridden_nodes[c];
        w.entries_start[c] = w.ov_in[c];
        if (v < N) {
            for (i64 j = in_start[v]; j < in_start[v + 1]; j++)
                if (in_node[j] >= 0) w.references[out_start[in_node[j]] + in_out[j]]--;
        }
        for (i64 j = w.ov_in[c]; j < w.ov_in[c + 1]; j++) {
            i64 s = w.ov_in_node[j];
            w.entries_arena[j] = s >= 0 ? w.offset[s] + w.ov_in_out[j] : -1;
            if (w.seen[v] && s >= 0) w.references[w.entries_arena[j]]++;
        }
    }
    w.entries_start[count] = ni;
    if (length != M) {
        for (i64 v = 0; v < N; v++) {
            if (w.seen[v] || w.override[v] >= 0) continue;
            for (i64 j = in_start[v]; j < in_start[v + 1]; j++)
                if (in_node[j] >= 0) w.references[out_start[in_node[j]] + in_out[j]]--;
        }
    }

    /* nnvm's greedy PlanMemory walk (_allocate). */
    ALLOC(w.storage, total);
    for (i64 e = 0; e < total; e++) w.storage[e] = -2;
    ALLOC(w.block_size, total);
    ALLOC(w.block_refs, total);
    i64 num_blocks = 0, allocated = 0;
    const i64 match = m->match_range;
    ALLOC(w.wanted, m->max_outputs);
    ALLOC(w.entries_buffer, 1);
    i64 entries_capacity = 1;
    for (i64 t = 0; t < length; t++) {
        i64 v = w.order[t], o = w.override[v], f = w.copy_of[v];
        const i64 *entries;
        i64 num_inputs;
        if (o >= 0) {
            entries = w.entries_arena + w.entries_start[o];
            num_inputs = w.entries_start[o + 1] - w.entries_start[o];
        } else {
            num_inputs = in_start[v + 1] - in_start[v];
            if (num_inputs > entries_capacity) {
                i64 *grown = realloc(w.entries_buffer, (size_t)num_inputs * sizeof(i64));
                if (!grown) goto nomem;
                w.entries_buffer = grown;
                entries_capacity = num_inputs;
            }
            for (i64 j = 0; j < num_inputs; j++) {
                i64 s = in_node[in_start[v] + j];
                w.entries_buffer[j] = s >= 0 ? out_start[s] + in_out[in_start[v] + j] : -1;
            }
            entries = w.entries_buffer;
        }
        i64 base = w.offset[v], num_outputs = out_start[f + 1] - out_start[f];
        const i64 *out_sizes = entry_size + out_start[f];
        i64 kind = op_kind[f];
        if (kind & (KIND_ONE | KIND_TWO)) {
            int identity = (kind & KIND_IDENTITY) != 0;
            int pairs = (kind & KIND_TWO) ? 2 : 1;
            for (int p = 0; p < pairs; p++) {  /* pairs (0, 0) then (1, 0); output 0 either way */
                i64 position = p;
                if (position >= num_inputs || num_outputs < 1) continue;
                i64 source = entries[position], out_entry = base;
                if (source < 0 || w.storage[out_entry] != -2) continue;
                i64 block = w.storage[source];
                if (block < 0 || !(w.block_refs[block] == 1 || identity)) continue;
                if (w.references[out_entry] > 0 && w.sizes[source] == out_sizes[0]) {
                    w.storage[out_entry] = block;
                    w.block_refs[block] += w.references[out_entry];
                }
            }
        }
        /* Outputs wanting a block, largest first (ties: the later entry first); the buffer
           holds the widest operator's outputs (Model.max_outputs), whatever their number. */
        i64 num_wanted = 0;
        for (i64 k = 0; k < num_outputs; k++) {
            if (w.storage[base + k] != -2) continue;
            w.wanted[num_wanted].size = out_sizes[k];
            w.wanted[num_wanted++].output = k;
        }
        if (num_wanted > 1) qsort(w.wanted, (size_t)num_wanted, sizeof(Wanted), wanted_before);
        for (i64 q = 0; q < num_wanted; q++) {
            i64 k = w.wanted[q].output, entry = base + k, size = out_sizes[k];
            if (entry < E && gradient_flags[entry]) { w.storage[entry] = -1; continue; }
            i64 block = -1;
            if (match) {
                FreeList *fl = &w.free_list;
                i64 lo = 0, hi = fl->count;
                while (lo < hi) {  /* bisect_left(free, (size, -1)) */
                    i64 mid = (lo + hi) / 2;
                    if (fl->items[mid].size < size) lo = mid + 1; else hi = mid;
                }
                if (lo < fl->count && fl->items[lo].size <= size * match) {
                    block = free_pop(fl, lo);
                } else if (lo > 0 && fl->items[lo - 1].size >= size / match) {
                    block = free_pop(fl, lo - 1);
                    if (w.block_size[block] < size) {
                        allocated += size - w.block_size[block];
                        w.block_size[block] = size;
                    }
                }
            }
            if (block < 0) {
                block = num_blocks++;
                w.block_size[block] = size;
                w.block_refs[block] = 0;
                allocated += size;
            }
            if (limit >= 0 && limit < allocated) { result = allocated; goto done; }
            w.storage[entry] = block;
            w.block_refs[block] = w.references[entry];
        }
        for (i64 j = 0; j < num_inputs; j++) {
            i64 entry = entries[j];
            if (entry < 0) continue;
            i64 block = w.storage[entry];
            if (block < 0) continue;
            if (--w.block_refs[block] == 0 && free_insert(&w.free_list, w.block_size[block], block) < 0)
                goto nomem;
        }
        for (i64 k = 0; k < num_outputs; k++) {
            i64 block = w.storage[base + k];
            if (block >= 0 && w.block_refs[block] == 0 &&
                free_insert(&w.free_list, w.block_size[block], block) < 0)
                goto nomem;
        }
    }
    result = allocated;
done:
    work_free(&w);
    return result;
nomem:
    work_free(&w);
    return REPLAY_NO_MEMORY;
}

static int compare_ids(const void *a, const void *b) {
    i64 x = *(const i64 *)a, y = *(const i64 *)b;
    return (x > y) - (x < y);
}

/* planned_bytes_of_names(model, mirrored, index, limit): ``mirrored`` an iterable of node keys,
   ``index`` a dict from the keys MXNet may recompute to their forward ids (others are
   ignored, as AllocatorModel._mirror_ids does). */
static PyObject *planned_bytes_of_names(PyObject *self, PyObject *args) {
    PyObject *capsule, *mirrored, *index;
    long long limit;
    if (!PyArg_ParseTuple(args, "OOO!L", &capsule, &mirrored, &PyDict_Type, &index, &limit)) return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(capsule, "mirror_replay_model");
    if (!m) return NULL;
    Py_ssize_t capacity = PySet_Check(mirrored) || PyFrozenSet_Check(mirrored) ? PySet_GET_SIZE(mirrored) : 16;
    i64 *ids = (i64 *)malloc((size_t)(capacity > 0 ? capacity : 1) * sizeof(i64));
    if (!ids) return PyErr_NoMemory();
    i64 count = 0;
    PyObject *iterator = PyObject_GetIter(mirrored), *name;
    if (!iterator) { free(ids); return NULL; }
    while ((name = PyIter_Next(iterator)) != NULL) {
        PyObject *value = PyDict_GetItemWithError(index, name);
        Py_DECREF(name);
        if (!value) {
            if (PyErr_Occurred()) break;
            continue;
        }
        i64 id = PyLong_AsLongLong(value);
        if (id == -1 && PyErr_Occurred()) break;
        if (id < 0 || id >= m->num_forward) {
            PyErr_SetString(PyExc_ValueError, "a mirrored node's id is not a forward node");
            break;
        }
        if (count == capacity) {
            capacity *= 2;
            i64 *grown = (i64 *)realloc(ids, (size_t)capacity * sizeof(i64));
            if (!grown) { PyErr_NoMemory(); break; }
            ids = grown;
        }
        ids[count++] = id;
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) { free(ids); return NULL; }
    qsort(ids, (size_t)count, sizeof(i64), compare_ids);
    i64 unique = 0;
    for (i64 i = 0; i < count; i++)
        if (unique == 0 || ids[unique - 1] != ids[i]) ids[unique++] = ids[i];
    i64 result;
    Py_BEGIN_ALLOW_THREADS
    result = replay(m, ids, unique, limit);
    Py_END_ALLOW_THREADS
    free(ids);
    if (result < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(result);
}

static PyMethodDef methods[] = {
    {"planned_bytes_of_names", planned_bytes_of_names, METH_VARARGS,
     "planned_bytes_of_names(model, mirrored, index, limit) -> int"},
    {"prepare", prepare, METH_VARARGS, "prepare(num_forward, match_range, arrays) -> model"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_replay",
                                    "Compiled replay of MXNet's memory planner (see allocator.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__replay(void) { return PyModule_Create(&module); }
