"""Piece commitments (CommP) and piece CIDs, as Filecoin computes them.

The algorithm (Filecoin spec, "Piece"; FRC-0069 for the v2 CID):

1. The payload (a CAR file) is padded with zeros to the *unpadded piece size*,
   ``padded * 127/128`` for the smallest power of two ``padded >= 128`` whose
   unpadded size holds the payload.
2. Fr32 padding: every 127 bytes (four 254-bit field elements, read as a
   little-endian bit stream) become 128 bytes, each 254 bits followed by two
   zero bits.
3. A binary Merkle tree over the 32-byte nodes of the padded data: a parent is
   ``sha256(left || right)`` with the two most significant bits of its last
   byte cleared (so every node is a field element). The root is CommP.

The legacy piece CID is CIDv1(fil-commitment-unsealed 0xf101,
sha2-256-trunc254-padded 0x1012, root): ``baga6ea4sea...``. The FRC-0069
piece CID v2 is CIDv1(raw, fr32-sha256-trunc254-padbintree 0x1011,
``uvarint(padding) | uint8(height) | root``): ``bafkzcib...``; it carries the
tree height (the padded size) and the number of padding bytes (so the payload
size) too.

Speed: the cost is one SHA-256 of 64 bytes per tree node, about as many
calls as the piece has 32-byte leaves. Through ``hashlib`` that is about 1.8 us a
call here (Python object overhead dominates): 18 MB/s, far slower than packing.
So the per-node work (Fr32 padding and the tree over 4 MiB subtrees) runs in a
tiny C helper, compiled on first use with the system C compiler into
``$XDG_CACHE_HOME/jiaozifuse`` and loaded with ctypes: it uses the CPU's SHA
extensions where present (SHA-NI on x86-64) and a portable C SHA-256
otherwise. Without a compiler the same code runs in pure Python (correct,
slow); ``JIAOZIFUSE_COMMP_NATIVE=0`` forces that path (the tests compare both).
ctypes releases the GIL for the C calls, so the commitment can be computed on
another thread while the next CAR is being packed.

Zero padding is never hashed: a subtree of zeros has a known root per level
(:func:`zero_comm`), so the cost grows with the payload, not with its padding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .car import (
    FIL_COMMITMENT_UNSEALED,
    FR32_SHA256_TRUNC254_PADBINTREE,
    RAW,
    SHA2_256_TRUNC254_PADDED,
    cid_from_digest,
    cid_from_str,
    cid_str,
    parse_cid,
    read_varint,
    varint,
)

log = logging.getLogger(__name__)

IN_QUAD = 127
OUT_QUAD = 128
NODE = 32
MIN_PIECE = 128
#: Subtrees of this many quads are reduced in one native call: 4 MiB padded,
#: 2**17 leaves.
CHUNK_QUADS = 1 << 15
CHUNK_IN = CHUNK_QUADS * IN_QUAD
CHUNK_LEVEL = 17


def padded_piece_size(payload_size: int) -> int:
    """Smallest power of two >= 128 whose unpadded size (x 127/128) holds the payload."""
    quads = max(1, -(-payload_size // IN_QUAD))
    padded = quads * OUT_QUAD
    return max(MIN_PIECE, 1 << (padded - 1).bit_length())


def unpadded_size(padded: int) -> int:
    return padded // OUT_QUAD * IN_QUAD


def max_payload(target: int) -> int:
    """Largest payload that fits a piece of at most *target* padded bytes."""
    if target < MIN_PIECE:
        raise ValueError(f"a piece is at least {MIN_PIECE} bytes")
    return unpadded_size(1 << (target.bit_length() - 1))


def _node(a: bytes, b: bytes) -> bytes:
    d = bytearray(hashlib.sha256(a + b).digest())
    d[31] &= 0x3F
    return bytes(d)


_ZEROS = [bytes(NODE)]
for _ in range(64):
    _ZEROS.append(_node(_ZEROS[-1], _ZEROS[-1]))
_ZERO_TABLE = b"".join(_ZEROS)


def zero_comm(level: int) -> bytes:
    """Root of a subtree of zeros with 2**level leaves (Fr32 of zeros is zeros)."""
    return _ZEROS[level]


# -------------------------------------------------------------- pure Python

_M254 = (1 << 254) - 1


def fr32_pad(data: bytes | memoryview) -> bytes:
    """Fr32-pad *data* (a multiple of 127 bytes): 254 bits in, 256 bits out."""
    if len(data) % IN_QUAD:
        raise ValueError("Fr32 input must be a multiple of 127 bytes")
    out = bytearray()
    frm = int.from_bytes
    for i in range(0, len(data), IN_QUAD):
        x = frm(data[i : i + IN_QUAD], "little")
        y = (x & _M254) | ((x >> 254) & _M254) << 256 | ((x >> 508) & _M254) << 512 | (
            x >> 762) << 768
        out += y.to_bytes(OUT_QUAD, "little")
    return bytes(out)


def _reduce_py(nodes: list[bytes], levels: int, base: int = 0) -> bytes:
    """Reduce *nodes* (at tree level *base*) *levels* levels up, zero-padding on the right."""
    for level in range(base, base + levels):
        if not nodes:
            break
        if len(nodes) % 2:
            nodes.append(_ZEROS[level])
        nodes = [_node(nodes[i], nodes[i + 1]) for i in range(0, len(nodes), 2)]
    return nodes[0] if nodes else _ZEROS[base + levels]


def _subtree_py(data: bytes | memoryview, levels: int) -> bytes:
    padded = fr32_pad(data)
    return _reduce_py([padded[i : i + NODE] for i in range(0, len(padded), NODE)], levels)


# ------------------------------------------------------------------ native

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stddef.h>

static const uint32_t K[64] = {
 0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
 0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
 0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
 0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
 0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
 0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
 0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
 0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};
static const uint32_t IV[8] = {0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,
                               0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19};
/* Every message is 64 bytes, so the second SHA-256 block is always the same
   padding block: its schedule (plus K) is computed once. */
static uint32_t PADWK[64];

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void rounds(uint32_t s[8], const uint32_t wk[64]) {
  uint32_t a=s[0],b=s[1],c=s[2],d=s[3],e=s[4],f=s[5],g=s[6],h=s[7];
  for (int t = 0; t < 64; t++) {
    uint32_t t1 = h + (ROR(e,6)^ROR(e,11)^ROR(e,25)) + ((e&f)^(~e&g)) + wk[t];
    uint32_t t2 = (ROR(a,2)^ROR(a,13)^ROR(a,22)) + ((a&b)^(a&c)^(b&c));
    h=g; g=f; f=e; e=d+t1; d=c; c=b; b=a; a=t1+t2;
  }
  s[0]+=a; s[1]+=b; s[2]+=c; s[3]+=d; s[4]+=e; s[5]+=f; s[6]+=g; s[7]+=h;
}

static void schedule(const uint32_t w16[16], uint32_t wk[64]) {
  uint32_t w[64];
  memcpy(w, w16, 64);
  for (int t = 16; t < 64; t++) {
    uint32_t s0 = ROR(w[t-15],7)^ROR(w[t-15],18)^(w[t-15]>>3);
    uint32_t s1 = ROR(w[t-2],17)^ROR(w[t-2],19)^(w[t-2]>>10);
    w[t] = w[t-16] + s0 + w[t-7] + s1;
  }
  for (int t = 0; t < 64; t++) wk[t] = w[t] + K[t];
}

static void pair_generic(const uint8_t *in, uint8_t *out) {
  uint32_t w[16], wk[64], s[8];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)in[4*i]<<24 | (uint32_t)in[4*i+1]<<16 | (uint32_t)in[4*i+2]<<8 | in[4*i+3];
  schedule(w, wk);
  memcpy(s, IV, 32);
  rounds(s, wk);
  rounds(s, PADWK);
  for (int j = 0; j < 8; j++) {
    out[4*j]=(uint8_t)(s[j]>>24); out[4*j+1]=(uint8_t)(s[j]>>16);
    out[4*j+2]=(uint8_t)(s[j]>>8); out[4*j+3]=(uint8_t)s[j];
  }
  out[31] &= 0x3f;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <cpuid.h>
#define SHANI __attribute__((target("sha,sse4.1,ssse3")))

SHANI static void pair_shani(const uint8_t *in, uint8_t *out) {
  const __m128i BSWAP = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i tmp = _mm_loadu_si128((const __m128i *)&IV[0]);
  __m128i st1 = _mm_loadu_si128((const __m128i *)&IV[4]);
  tmp = _mm_shuffle_epi32(tmp, 0xB1);
  st1 = _mm_shuffle_epi32(st1, 0x1B);
  __m128i st0 = _mm_alignr_epi8(tmp, st1, 8);          /* ABEF */
  st1 = _mm_blend_epi16(st1, tmp, 0xF0);               /* CDGH */
  const __m128i abef0 = st0, cdgh0 = st1;
  __m128i w[16];
  for (int i = 0; i < 16; i++) {
    if (i < 4) {
      w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(in + 16*i)), BSWAP);
    } else {
      __m128i x = _mm_sha256msg1_epu32(w[i-4], w[i-3]);
      x = _mm_add_epi32(x, _mm_alignr_epi8(w[i-1], w[i-2], 4));
      w[i] = _mm_sha256msg2_epu32(x, w[i-1]);
    }
    __m128i msg = _mm_add_epi32(w[i], _mm_loadu_si128((const __m128i *)&K[4*i]));
    st1 = _mm_sha256rnds2_epu32(st1, st0, msg);
    msg = _mm_shuffle_epi32(msg, 0x0E);
    st0 = _mm_sha256rnds2_epu32(st0, st1, msg);
  }
  st0 = _mm_add_epi32(st0, abef0);
  st1 = _mm_add_epi32(st1, cdgh0);
  const __m128i abef1 = st0, cdgh1 = st1;
  for (int i = 0; i < 16; i++) {
    __m128i msg = _mm_loadu_si128((const __m128i *)&PADWK[4*i]);
    st1 = _mm_sha256rnds2_epu32(st1, st0, msg);
    msg = _mm_shuffle_epi32(msg, 0x0E);
    st0 = _mm_sha256rnds2_epu32(st0, st1, msg);
  }
  st0 = _mm_add_epi32(st0, abef1);
  st1 = _mm_add_epi32(st1, cdgh1);
  tmp = _mm_shuffle_epi32(st0, 0x1B);                  /* FEBA */
  st1 = _mm_shuffle_epi32(st1, 0xB1);                  /* DCHG */
  st0 = _mm_blend_epi16(tmp, st1, 0xF0);               /* DCBA */
  st1 = _mm_alignr_epi8(st1, tmp, 8);                  /* HGFE */
  _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(st0, BSWAP));
  _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(st1, BSWAP));
  out[31] &= 0x3f;
}

/* Two independent messages interleaved: rnds2 latency hides behind the other
   message's work (about 30% faster than one at a time). */
SHANI static void pair_shani2(const uint8_t *in, uint8_t *out) {
  const __m128i BSWAP = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i tmp = _mm_loadu_si128((const __m128i *)&IV[0]);
  __m128i s1 = _mm_loadu_si128((const __m128i *)&IV[4]);
  tmp = _mm_shuffle_epi32(tmp, 0xB1);
  s1 = _mm_shuffle_epi32(s1, 0x1B);
  const __m128i abef0 = _mm_alignr_epi8(tmp, s1, 8);
  const __m128i cdgh0 = _mm_blend_epi16(s1, tmp, 0xF0);
  __m128i a0 = abef0, a1 = cdgh0, b0 = abef0, b1 = cdgh0;
  __m128i wa[16], wb[16];
  for (int i = 0; i < 16; i++) {
    if (i < 4) {
      wa[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(in + 16*i)), BSWAP);
      wb[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(in + 64 + 16*i)), BSWAP);
    } else {
      __m128i x = _mm_sha256msg1_epu32(wa[i-4], wa[i-3]);
      __m128i y = _mm_sha256msg1_epu32(wb[i-4], wb[i-3]);
      x = _mm_add_epi32(x, _mm_alignr_epi8(wa[i-1], wa[i-2], 4));
      y = _mm_add_epi32(y, _mm_alignr_epi8(wb[i-1], wb[i-2], 4));
      wa[i] = _mm_sha256msg2_epu32(x, wa[i-1]);
      wb[i] = _mm_sha256msg2_epu32(y, wb[i-1]);
    }
    __m128i k = _mm_loadu_si128((const __m128i *)&K[4*i]);
    __m128i ma = _mm_add_epi32(wa[i], k), mb = _mm_add_epi32(wb[i], k);
    a1 = _mm_sha256rnds2_epu32(a1, a0, ma);
    b1 = _mm_sha256rnds2_epu32(b1, b0, mb);
    ma = _mm_shuffle_epi32(ma, 0x0E); mb = _mm_shuffle_epi32(mb, 0x0E);
    a0 = _mm_sha256rnds2_epu32(a0, a1, ma);
    b0 = _mm_sha256rnds2_epu32(b0, b1, mb);
  }
  a0 = _mm_add_epi32(a0, abef0); a1 = _mm_add_epi32(a1, cdgh0);
  b0 = _mm_add_epi32(b0, abef0); b1 = _mm_add_epi32(b1, cdgh0);
  const __m128i sa0 = a0, sa1 = a1, sb0 = b0, sb1 = b1;
  for (int i = 0; i < 16; i++) {
    __m128i m = _mm_loadu_si128((const __m128i *)&PADWK[4*i]);
    a1 = _mm_sha256rnds2_epu32(a1, a0, m);
    b1 = _mm_sha256rnds2_epu32(b1, b0, m);
    m = _mm_shuffle_epi32(m, 0x0E);
    a0 = _mm_sha256rnds2_epu32(a0, a1, m);
    b0 = _mm_sha256rnds2_epu32(b0, b1, m);
  }
  a0 = _mm_add_epi32(a0, sa0); a1 = _mm_add_epi32(a1, sa1);
  b0 = _mm_add_epi32(b0, sb0); b1 = _mm_add_epi32(b1, sb1);
  __m128i t;
  t = _mm_shuffle_epi32(a0, 0x1B); a1 = _mm_shuffle_epi32(a1, 0xB1);
  a0 = _mm_blend_epi16(t, a1, 0xF0); a1 = _mm_alignr_epi8(a1, t, 8);
  t = _mm_shuffle_epi32(b0, 0x1B); b1 = _mm_shuffle_epi32(b1, 0xB1);
  b0 = _mm_blend_epi16(t, b1, 0xF0); b1 = _mm_alignr_epi8(b1, t, 8);
  _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(a0, BSWAP));
  _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(a1, BSWAP));
  _mm_storeu_si128((__m128i *)(out + 32), _mm_shuffle_epi8(b0, BSWAP));
  _mm_storeu_si128((__m128i *)(out + 48), _mm_shuffle_epi8(b1, BSWAP));
  out[31] &= 0x3f; out[63] &= 0x3f;
}

static int have_shani(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 29))) return 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  return (c & (1u << 19)) && (c & (1u << 9));  /* SSE4.1, SSSE3 */
}
#else
static int have_shani(void) { return 0; }
static void pair_shani(const uint8_t *in, uint8_t *out) { pair_generic(in, out); }
static void pair_shani2(const uint8_t *in, uint8_t *out) {
  pair_generic(in, out);
  pair_generic(in + 64, out + 32);
}
#endif

static int use_shani = 0;

int jz_init(int allow_shani) {
  uint32_t w[16] = {0x80000000u,0,0,0,0,0,0,0,0,0,0,0,0,0,0,512};
  schedule(w, PADWK);
  use_shani = allow_shani && have_shani();
  return use_shani;
}

/* out[i] = node(in[2i], in[2i+1]); out may be in (it never overtakes). */
void jz_hash_pairs(const uint8_t *in, size_t n, uint8_t *out) {
  if (use_shani) {
    size_t i = 0;
    for (; i + 1 < n; i += 2) pair_shani2(in + 64*i, out + 32*i);
    if (i < n) pair_shani(in + 64*i, out + 32*i);
  } else {
    for (size_t i = 0; i < n; i++) pair_generic(in + 64*i, out + 32*i);
  }
}

void jz_fr32(const uint8_t *in, size_t nquads, uint8_t *out) {
  for (size_t q = 0; q < nquads; q++) {
    const uint8_t *s = in + 127*q;
    uint8_t *o = out + 128*q;
    memcpy(o, s, 32);
    o[31] &= 0x3f;
    for (int i = 32; i < 64; i++) o[i] = (uint8_t)((s[i] << 2) | (s[i-1] >> 6));
    o[63] &= 0x3f;
    for (int i = 64; i < 96; i++) o[i] = (uint8_t)((s[i] << 4) | (s[i-1] >> 4));
    o[95] &= 0x3f;
    for (int i = 96; i < 127; i++) o[i] = (uint8_t)((s[i] << 6) | (s[i-1] >> 2));
    o[127] = (uint8_t)(s[126] >> 2);
  }
}

/* Root of the subtree of height `levels` whose first leaves are the Fr32
   padding of `nquads` quads of `in` (the rest zeros). `scratch` holds
   nquads*128 + 32 bytes. */
void jz_subtree(const uint8_t *in, size_t nquads, int levels, const uint8_t *zeros,
                uint8_t *scratch, uint8_t *root) {
  size_t n = nquads * 4;
  jz_fr32(in, nquads, scratch);
  for (int l = 0; l < levels; l++) {
    if (n == 0) break;
    if (n & 1) { memcpy(scratch + 32*n, zeros + 32*l, 32); n++; }
    jz_hash_pairs(scratch, n / 2, scratch);
    n /= 2;
  }
  if (n == 0) memcpy(root, zeros + 32*levels, 32);
  else memcpy(root, scratch, 32);
}
"""

_native_lock = threading.Lock()
_native_lib: ctypes.CDLL | None = None
_native_tried = False
NATIVE_KIND = "python"


def _cache_dirs() -> list[Path]:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(base) / "jiaozifuse", Path(tempfile.gettempdir()) / f"jiaozifuse-{os.getuid()}"]


def _safe_dir(d: Path) -> bool:
    """Ours and writable by nobody else: a shared temp directory could hold a planted .so."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _compile(target: Path) -> bool:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    fd, src = tempfile.mkstemp(suffix=".c", dir=target.parent)
    tmp = f"{src}.so"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_C_SOURCE)
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, src],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            log.warning("cannot compile the CommP helper: %s", res.stderr.strip()[-500:])
            return False
        os.replace(tmp, target)  # atomic: concurrent builders do not clash
        for old in target.parent.glob("commp-*.so"):  # builds of earlier versions
            if old != target:
                old.unlink(missing_ok=True)
        return True
    finally:
        for p in (src, tmp):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _native() -> ctypes.CDLL | None:
    """The compiled helper, built on first use; None when unavailable or disabled."""
    global _native_lib, _native_tried, NATIVE_KIND
    if os.environ.get("JIAOZIFUSE_COMMP_NATIVE", "1") == "0":
        return None
    if _native_tried:
        return _native_lib
    with _native_lock:
        if _native_tried:
            return _native_lib
        tag = hashlib.sha256(
            (_C_SOURCE + sys.platform + platform.machine()).encode()).hexdigest()[:16]
        for d in _cache_dirs():
            so = d / f"commp-{tag}.so"
            try:
                if not _safe_dir(d):
                    continue
                if not so.exists() and not _compile(so):
                    continue
                if so.stat().st_uid != os.getuid():
                    continue
                lib = ctypes.CDLL(str(so))
            except OSError as exc:
                log.debug("CommP helper in %s unusable: %s", d, exc)
                continue
            lib.jz_init.argtypes = [ctypes.c_int]
            lib.jz_init.restype = ctypes.c_int
            lib.jz_subtree.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                       ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p]
            lib.jz_subtree.restype = None
            allow = os.environ.get("JIAOZIFUSE_COMMP_SHANI", "1") != "0"
            NATIVE_KIND = "c+sha-ni" if lib.jz_init(int(allow)) else "c"
            _native_lib = lib
            break
        else:
            log.warning("CommP runs in pure Python (no C compiler?): expect about 20 MB/s")
        _native_tried = True
        return _native_lib


def _buffer_address(buf: bytearray) -> tuple[int, object]:
    """Address of a bytearray's storage, plus the ctypes object keeping it exported."""
    holder = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(holder), holder


class _Subtree:
    """Reduces runs of quads to subtree roots, natively when it can."""

    def __init__(self) -> None:
        self.lib = _native()
        self.scratch = bytearray(CHUNK_QUADS * OUT_QUAD + NODE) if self.lib else None

    def root(self, data: bytearray, nquads: int, levels: int) -> bytes:
        """*data*: at least nquads*127 bytes (a bytearray, read in place)."""
        if self.lib is None:
            return _subtree_py(memoryview(data)[: nquads * IN_QUAD], levels)
        assert self.scratch is not None and nquads <= CHUNK_QUADS
        out = ctypes.create_string_buffer(NODE)
        src, hold_src = _buffer_address(data)
        dst, hold_dst = _buffer_address(self.scratch)
        self.lib.jz_subtree(src, nquads, levels, _ZERO_TABLE, dst, out)
        del hold_src, hold_dst
        return out.raw


# ------------------------------------------------------------------ pieces


@dataclass(frozen=True, slots=True)
class Piece:
    """A piece commitment with the sizes that go with it."""

    root: bytes
    payload_size: int
    padded_size: int

    @property
    def height(self) -> int:
        return self.padded_size.bit_length() - 1 - 5

    @property
    def padding(self) -> int:
        """Zero bytes appended to the payload before Fr32 padding (FRC-0069)."""
        return unpadded_size(self.padded_size) - self.payload_size

    @property
    def cid_v1(self) -> str:
        """Legacy piece CID (``baga6ea4sea...``), what deal tools call CommP."""
        return cid_str(cid_from_digest(FIL_COMMITMENT_UNSEALED, self.root,
                                       SHA2_256_TRUNC254_PADDED))

    @property
    def cid_v2(self) -> str:
        """FRC-0069 piece CID (``bafkzcib...``): root, height and padding in one."""
        digest = varint(self.padding) + bytes([self.height]) + self.root
        return cid_str(cid_from_digest(RAW, digest, FR32_SHA256_TRUNC254_PADBINTREE))

    def as_dict(self) -> dict[str, object]:
        return {"piece_cid": self.cid_v1, "piece_cid_v2": self.cid_v2,
                "piece_size": self.padded_size, "payload_size": self.payload_size}


@dataclass(frozen=True, slots=True)
class PieceRef:
    """What a piece CID says: the root, and with a v2 CID the sizes too."""

    root: bytes
    padded_size: int | None = None
    payload_size: int | None = None

    def matches(self, piece: Piece) -> bool:
        return (self.root == piece.root
                and self.padded_size in (None, piece.padded_size)
                and self.payload_size in (None, piece.payload_size))


def parse_piece_cid(text: str) -> PieceRef:
    """Decode a v1 (``baga...``) or v2 (``bafkzcib...``) piece CID."""
    cid, _ = parse_cid(cid_from_str(text))
    if cid.codec == FIL_COMMITMENT_UNSEALED and cid.mh_code == SHA2_256_TRUNC254_PADDED:
        if len(cid.digest) != NODE:
            raise ValueError(f"{text}: piece commitment of {len(cid.digest)} bytes")
        return PieceRef(cid.digest)
    if cid.codec == RAW and cid.mh_code == FR32_SHA256_TRUNC254_PADBINTREE:
        padding, p = read_varint(cid.digest, 0)
        if len(cid.digest) != p + 1 + NODE:
            raise ValueError(f"{text}: malformed piece multihash")
        height = cid.digest[p]
        padded = NODE << height
        return PieceRef(cid.digest[p + 1 :], padded, unpadded_size(padded) - padding)
    raise ValueError(f"{text} is not a piece CID")


class CommP:
    """Streaming piece commitment: :meth:`write` bytes, then :meth:`piece`.

    Full 4 MiB runs are reduced to subtree roots as they arrive, so memory
    stays small whatever the piece size. A CAR's header (its roots) is final
    only once the whole file is written: :meth:`piece` takes the final first
    bytes (*first*) and recomputes the one subtree they fall in. :meth:`seal`
    frees the buffer of a piece that is complete but not yet final.
    """

    def __init__(self) -> None:
        self._sub = _Subtree()
        self._buf: bytearray | None = bytearray(CHUNK_IN)
        self._fill = 0
        self._roots: list[bytes] = []
        self._tail: bytes | None = None
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._buf is None or len(self._buf) != CHUNK_IN:
            raise ValueError("this CommP is sealed")
        mv = memoryview(data).cast("B")
        self.size += len(mv)
        while len(mv):
            take = min(len(mv), CHUNK_IN - self._fill)
            self._buf[self._fill : self._fill + take] = mv[:take]
            self._fill += take
            mv = mv[take:]
            if self._fill == CHUNK_IN:
                self._roots.append(self._sub.root(self._buf, CHUNK_QUADS, CHUNK_LEVEL))
                self._fill = 0

    def seal(self) -> None:
        """No more writes: hash the tail and drop the 4 MiB buffer."""
        if self._buf is None:
            return
        if self._roots:
            if self._fill:
                self._tail = self._tail_root(self._buf, self._fill, CHUNK_LEVEL)
            self._buf = None
        else:
            self._buf = bytearray(self._buf[: self._fill])

    def _tail_root(self, buf: bytearray, fill: int, levels: int) -> bytes:
        quads = -(-fill // IN_QUAD)
        if len(buf) < quads * IN_QUAD:
            buf = buf + bytes(quads * IN_QUAD - len(buf))
        buf[fill : quads * IN_QUAD] = bytes(quads * IN_QUAD - fill)
        return self._sub.root(buf, quads, levels)

    def piece(self, first: bytes | None = None) -> Piece:
        """The commitment; *first* replaces the piece's first bytes (within 4 MiB)."""
        padded = padded_piece_size(self.size)
        height = padded.bit_length() - 1 - 5
        if first is not None and len(first) > min(self.size, CHUNK_IN):
            raise ValueError("only the first 4 MiB of a piece can be replaced")
        if not self._roots:  # the whole payload is in the buffer
            assert self._buf is not None
            buf = bytearray(self._buf[: self._fill])
            if first is not None:
                buf[: len(first)] = first
            return Piece(self._tail_root(buf, self._fill, height), self.size, padded)
        roots = list(self._roots)
        if first is not None:
            if len(first) != CHUNK_IN:
                raise ValueError("give the whole first 4 MiB of the piece")
            roots[0] = self._sub.root(bytearray(first), CHUNK_QUADS, CHUNK_LEVEL)
        tail = self._tail
        if self._buf is not None and self._fill:
            tail = self._tail_root(bytearray(self._buf[: self._fill]), self._fill, CHUNK_LEVEL)
        if tail is not None:
            roots.append(tail)
        return Piece(_reduce_py(roots, height - CHUNK_LEVEL, CHUNK_LEVEL), self.size, padded)


class ThreadedCommP:
    """A :class:`CommP` fed from another thread, so hashing overlaps packing."""

    def __init__(self, depth: int = 8) -> None:
        import queue

        self.commp = CommP()
        self._q: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="commp", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self.commp.write(item)
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc

    def write(self, data: bytes) -> None:
        self._q.put(data if isinstance(data, bytes) else bytes(data))

    def close(self) -> CommP:
        """Wait for everything written, seal, and return the underlying CommP."""
        self._q.put(None)
        self._t.join()
        if self._error is not None:
            raise self._error
        self.commp.seal()
        return self.commp

    def abort(self) -> None:
        self._q.put(None)
        self._t.join()


def commp_bytes(data: bytes | bytearray | memoryview) -> Piece:
    c = CommP()
    c.write(data)
    return c.piece()


def commp_file(path: str | Path, progress: Callable[[int], None] | None = None) -> Piece:
    c = CommP()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_IN)
            if not block:
                break
            c.write(block)
            if progress:
                progress(len(block))
    return c.piece()


def native_kind() -> str:
    """``c+sha-ni``, ``c`` or ``python``: which implementation computes the tree."""
    _native()
    return NATIVE_KIND if _native_lib is not None and os.environ.get(
        "JIAOZIFUSE_COMMP_NATIVE", "1") != "0" else "python"


__all__ = [
    "CommP", "Piece", "PieceRef", "ThreadedCommP", "commp_bytes", "commp_file", "fr32_pad",
    "max_payload", "native_kind", "padded_piece_size", "parse_piece_cid", "unpadded_size",
    "zero_comm",
]
