// Samples to files as the Python side writes them (export/onnx_sampler.save_images): a PNG grid, a numpy .npz of
// the uint8 pixels (and the labels), or the float32 values as a .npy; each file written atomically. to_uint8's
// float arithmetic is compiled with -ffp-contract=off, as the sampler's is, so that it rounds as numpy's does.
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "ddpm/sampler.h"
#include "parse.h"

namespace ddpm {
namespace {

// Little-endian (zip, .npy) and big-endian (PNG) unsigned integers of `bytes` bytes.
std::string le(uint64_t v, int bytes) {
  std::string s;
  for (int i = 0; i < bytes; ++i) s += char(v >> (8 * i) & 0xff);
  return s;
}
std::string be32(uint32_t v) {
  std::string s = le(v, 4);
  return std::string(s.rbegin(), s.rend());
}

uint32_t crc(const std::string& bytes) {
  return uint32_t(crc32_z(0, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size()));
}

using Parts = std::vector<std::pair<const void*, size_t>>;  // (where, how many bytes)

// Writes the parts, in order, to a new file in path's folder (the permissions of a new file: 0666 less the umask),
// then renames it to path: nobody sees half a file, and a failed write leaves the old one.
void write_atomically(const std::string& path, const Parts& parts) {
  static std::atomic<unsigned> count{0};
  const std::string tmp = path + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(count++);
  std::FILE* f = std::fopen(tmp.c_str(), "wbx");  // x: O_EXCL
  bool ok = f != nullptr;
  for (const auto& part : parts) ok = ok && std::fwrite(part.first, 1, part.second, f) == part.second;
  ok = (f && std::fclose(f) == 0) && ok;
  if (ok && std::rename(tmp.c_str(), path.c_str()) == 0) return;
  const std::string why = std::strerror(errno);
  if (f) std::remove(tmp.c_str());
  throw Error("cannot write " + printable(path, 500) + ": " + why);
}

// A .npy header (format 1.0) for a C-order array, padded so that the data starts at a multiple of 64 bytes.
std::string npy_header(const std::string& descr, const std::vector<int64_t>& shape) {
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  std::string h = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims +
                  (shape.size() == 1 ? ",)" : ")") + ", }";
  h.append(63 - (10 + h.size()) % 64, ' ').push_back('\n');
  return std::string("\x93NUMPY\x01\x00", 8) + le(h.size(), 2) + h;
}

// A zip archive of stored (uncompressed) entries {name, bytes}, as np.savez writes one; no zip64, so an archive
// over 4 GiB is an Error.
void save_zip(const std::string& path, const std::vector<std::pair<std::string, std::string>>& entries) {
  std::vector<std::string> locals;
  std::string central;
  Parts parts;
  uint64_t offset = 0;
  for (const auto& [name, data] : entries) {
    // Version 2.0, no flags, stored, 00:00 on 1980-01-01, CRC-32, both sizes, the name's length, no extra field.
    const std::string fields = le(20, 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(0x21, 2) + le(crc(data), 4) +
                               le(data.size(), 4) + le(data.size(), 4) + le(name.size(), 2) + le(0, 2);
    // Made by version 2.0; no comment, disk 0, no attributes; where the entry starts.
    central += le(0x02014b50, 4) + le(20, 2) + fields + le(0, 6) + le(0, 4) + le(offset, 4) + name;
    locals.push_back(le(0x04034b50, 4) + fields + name);
    offset += locals.back().size() + data.size();
    need(offset + central.size() < 0xFFFF0000u,
         "cannot write " + printable(path, 500) + ": over 4 GiB, too large for a .npz (write fewer images at a time)");
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    parts.emplace_back(locals[i].data(), locals[i].size());
    parts.emplace_back(entries[i].second.data(), entries[i].second.size());
  }
  const std::string end = le(0x06054b50, 4) + le(0, 4) + le(entries.size(), 2) + le(entries.size(), 2) +
                          le(central.size(), 4) + le(offset, 4) + le(0, 2);
  parts.emplace_back(central.data(), central.size());
  parts.emplace_back(end.data(), end.size());
  write_atomically(path, parts);
}

// uint8 pixels [N, C, H, W] as a .npz: arr_0 [N, H, W, C] and, given labels, arr_1 int64 [N].
void save_npz(const std::string& path, const std::vector<uint8_t>& pixels, int64_t n, const ModelInfo& m,
              const std::vector<int64_t>& labels) {
  std::string x = npy_header("|u1", {n, m.H, m.W, m.C});
  const size_t at = x.size();
  const int64_t hw = m.H * m.W;
  x.resize(at + pixels.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < m.C; ++c)
      for (int64_t p = 0; p < hw; ++p) x[at + (i * hw + p) * m.C + c] = char(pixels[(i * m.C + c) * hw + p]);
  std::vector<std::pair<std::string, std::string>> entries = {{"arr_0.npy", std::move(x)}};
  if (!labels.empty()) {
    std::string y = npy_header("<i8", {n});
    for (int64_t label : labels) y += le(uint64_t(label), 8);
    entries.emplace_back("arr_1.npy", y);
  }
  save_zip(path, entries);
}

std::string png_chunk(const char* tag, const std::string& data) {
  const std::string body = tag + data;
  return be32(uint32_t(data.size())) + body + be32(crc(body));
}

// A grid of `cols` columns with 2-pixel black gutters, as export/onnx_sampler.image_grid: images under 32 pixels
// are enlarged by an integer factor (nearest neighbour). 8-bit grey or RGB, rows unfiltered, zlib level 9: the
// bytes Python's writer gives with the same zlib.
void save_png(const std::string& path, const std::vector<uint8_t>& pixels, int64_t n, const ModelInfo& m, int64_t cols) {
  need(m.C == 1 || m.C == 3, "cannot write " + printable(path, 500) + ": a .png needs 1 or 3 channels, the images have " +
                                 std::to_string(m.C) + " (write a .npz)");
  const int64_t s = std::max<int64_t>(1, 32 / std::max(m.H, m.W)), th = m.H * s, tw = m.W * s, pad = 2;
  const int64_t rows = (n + cols - 1) / cols, gw = cols * (tw + pad) + pad, gh = rows * (th + pad) + pad;
  need(gw < (1 << 30) && gh < (1 << 30), "cannot write " + printable(path, 500) + ": the grid is too large for a .png");
  std::string raw(size_t(gh * (1 + gw * m.C)), '\0');  // each row: filter type 0, then the pixels
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < m.C; ++c)
      for (int64_t y = 0; y < th; ++y)
        for (int64_t u = 0; u < tw; ++u) {
          const int64_t gy = (i / cols) * (th + pad) + pad + y, gx = (i % cols) * (tw + pad) + pad + u;
          raw[gy * (1 + gw * m.C) + 1 + gx * m.C + c] = char(pixels[((i * m.C + c) * m.H + y / s) * m.W + u / s]);
        }
  uLongf size = compressBound(raw.size());
  std::string z(size, '\0');
  need(compress2(reinterpret_cast<Bytef*>(&z[0]), &size, reinterpret_cast<const Bytef*>(raw.data()), raw.size(), 9) == Z_OK,
       "cannot write " + printable(path, 500) + ": zlib failed (out of memory?)");
  z.resize(size);
  const std::string png = "\x89PNG\r\n\x1a\n" +
      png_chunk("IHDR", be32(uint32_t(gw)) + be32(uint32_t(gh)) + char(8) + char(m.C == 3 ? 2 : 0) + std::string(3, '\0')) +
      png_chunk("IDAT", z) + png_chunk("IEND", "");
  write_atomically(path, {{png.data(), png.size()}});
}

bool has_suffix(const std::string& path, const char* suffix) {  // case-insensitive, as Python's commands
  const size_t n = std::strlen(suffix);
  return path.size() >= n && std::equal(path.end() - n, path.end(), suffix, [](char a, char b) {
    return std::tolower(uint8_t(a)) == b;
  });
}

void write_images(const std::string& path, const float* x, size_t n_floats, const ModelInfo& info,
                  const std::vector<int64_t>& labels) {
  const size_t chw = info.image_floats();
  need(x != nullptr && info.C > 0 && info.H > 0 && info.W > 0 && n_floats >= chw && n_floats % chw == 0,
       "save_images needs n >= 1 images of C*H*W = " + std::to_string(chw) + " floats, got " + std::to_string(n_floats));
  const int64_t n = int64_t(n_floats / chw);
  need(labels.empty() || int64_t(labels.size()) == n, "save_images needs one label per image, or none");
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, ".npy: the floats are written as they are, '<f4'");
  if (has_suffix(path, ".npy")) {
    const std::string header = npy_header("<f4", {n, info.C, info.H, info.W});
    return write_atomically(path, {{header.data(), header.size()}, {x, n_floats * sizeof(float)}});
  }
  need(has_suffix(path, ".png") || has_suffix(path, ".npz"),
       "cannot write " + printable(path, 500) + ": the name must end in .png, .npz or .npy");
  const std::vector<uint8_t> pixels = to_uint8(x, n_floats);
  if (has_suffix(path, ".npz")) return save_npz(path, pixels, n, info, labels);
  // Given labels (balanced blocks of classes), a row per class, as `ddpm onnx-sample`; else a square grid.
  const int64_t classes = int64_t(std::set<int64_t>(labels.begin(), labels.end()).size());
  save_png(path, pixels, n, info, classes ? (n + classes - 1) / classes : int64_t(std::ceil(std::sqrt(double(n)))));
}

}  // namespace

std::vector<uint8_t> to_uint8(const float* x, size_t n) {
  std::vector<uint8_t> out = allocating([n] { return std::vector<uint8_t>(n); });
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i] > -1.0f ? std::min(x[i], 1.0f) : -1.0f;  // NaN fails the comparison: -1
    out[i] = uint8_t(std::nearbyint((v + 1.0f) * 127.5f));
  }
  return out;
}

void save_images(const std::string& path, const float* x, size_t n_floats, const ModelInfo& info,
                 const std::vector<int64_t>& labels) {
  allocating([&] { write_images(path, x, n_floats, info, labels); });
}

}  // namespace ddpm
