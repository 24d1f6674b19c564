// Independent checks of what jiaozifuse writes, with the JavaScript implementations
// the IPFS and Filecoin ecosystems use. One JSON document on stdout per call.
//
//   node check.mjs commp FILE...           piece CIDs (v1 and v2) of each file's bytes
//   node check.mjs car FILE                roots, version and every block of a CAR; each
//                                          block's sha2-256 is verified and each dag-pb and
//                                          dag-cbor block must re-encode to the same bytes
//   node check.mjs unixfs ROOT FILE...     walk the UnixFS DAG at ROOT across the CARs:
//                                          path, type, mode, mtime, size and sha256 of files
import fs from 'node:fs'
import crypto from 'node:crypto'
import { CarBlockIterator } from '@ipld/car/iterator'
import { CarIndexedReader } from '@ipld/car/indexed-reader'
import * as dagPB from '@ipld/dag-pb'
import * as dagCBOR from '@ipld/dag-cbor'
import { sha256 } from 'multiformats/hashes/sha2'
import { CID } from 'multiformats/cid'
import { equals } from 'multiformats/bytes'
import { Piece } from '@web3-storage/data-segment'
import { exporter } from 'ipfs-unixfs-exporter'

const [cmd, ...args] = process.argv.slice(2)

function out (doc) {
  process.stdout.write(JSON.stringify(doc, (_, v) => typeof v === 'bigint' ? Number(v) : v) + '\n')
}

async function commp (files) {
  const res = []
  for (const f of files) {
    const piece = Piece.fromPayload(fs.readFileSync(f))
    res.push({
      file: f,
      v1: piece.toInfo().link.toString(),
      v2: piece.link.toString(),
      size: piece.size,
      padding: piece.padding,
      height: piece.height
    })
  }
  out(res)
}

async function car (file) {
  const it = await CarBlockIterator.fromIterable(fs.createReadStream(file))
  const roots = (await it.getRoots()).map(String)
  const blocks = []
  for await (const { cid, bytes } of it) {
    if (cid.multihash.code !== sha256.code) throw new Error(`${cid}: not sha2-256`)
    const digest = await sha256.digest(bytes)
    if (!equals(digest.bytes, cid.multihash.bytes)) throw new Error(`${cid}: hash mismatch`)
    if (cid.code === dagPB.code) {
      if (!equals(dagPB.encode(dagPB.prepare(dagPB.decode(bytes))), bytes)) {
        throw new Error(`${cid}: dag-pb block is not canonical`)
      }
    } else if (cid.code === dagCBOR.code) {
      if (!equals(dagCBOR.encode(dagCBOR.decode(bytes)), bytes)) {
        throw new Error(`${cid}: dag-cbor block is not canonical`)
      }
    }
    blocks.push({ cid: cid.toString(), codec: cid.code, size: bytes.length })
  }
  out({ version: it.version, roots, blocks })
}

async function unixfs (root, files) {
  const readers = await Promise.all(files.map((f) => CarIndexedReader.fromFile(f)))
  const blockstore = {
    async * get (cid) {
      for (const r of readers) {
        const b = await r.get(cid)
        if (b) {
          const digest = await sha256.digest(b.bytes)
          if (!equals(digest.bytes, cid.multihash.bytes)) throw new Error(`${cid}: hash mismatch`)
          yield b.bytes
          return
        }
      }
      throw new Error(`missing block ${cid}`)
    }
  }
  const entries = []
  const visit = async (cid, path) => {
    const e = await exporter(cid, blockstore)
    const u = e.unixfs
    const rec = { path, type: u ? u.type : e.type, mode: u?.mode }
    if (u?.mtime) rec.mtime = [u.mtime.secs, u.mtime.nsecs ?? 0]
    if (u?.type === 'symlink') {
      rec.target = Buffer.from(u.data).toString('latin1')
    } else if (e.type === 'file' || e.type === 'raw') {
      const h = crypto.createHash('sha256')
      let size = 0
      for await (const c of e.content()) { h.update(c); size += c.length }
      rec.size = size
      rec.sha256 = h.digest('hex')
    }
    entries.push(rec)
    if (e.type === 'directory') {
      for await (const child of e.entries()) {
        await visit(child.cid, path ? `${path}/${child.name}` : child.name)
      }
    }
  }
  await visit(CID.parse(root), '')
  out(entries)
}

const commands = { commp: () => commp(args), car: () => car(args[0]), unixfs: () => unixfs(args[0], args.slice(1)) }
if (!commands[cmd]) {
  console.error(`unknown command ${cmd}`)
  process.exit(2)
}
commands[cmd]().catch((err) => { console.error(String(err?.stack ?? err)); process.exit(1) })
