// Text helpers shared by the library (metadata, files) and the command (flags): whole-string number parsing with
// std::from_chars, not strtod, which ignores the C locale (an embedding program may have set one with a decimal
// comma); comma-separated fields; one-line messages.
#pragma once
#include <charconv>
#include <cmath>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "ddpm/sampler.h"

namespace ddpm {

inline void need(bool ok, const std::string& message) {
  if (!ok) throw Error(message);
}

// Runs f; a failed allocation becomes an Error, the one type the library throws.
template <typename F>
auto allocating(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    throw Error("out of memory (use a smaller batch, or fewer images at a time)");
  }
}

// Every comma-separated field, empty ones included ("1,8,8," has four), as Python's str.split(",").
inline std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts(1);
  for (char c : s) {
    if (c == ',') parts.emplace_back();
    else parts.back().push_back(c);
  }
  return parts;
}

// Text from a file (or from ONNX Runtime about a file) fit for a one-line message: at most `limit` characters,
// line breaks and tabs as spaces, other controls and non-ASCII bytes as '?', so that a hostile file cannot break
// the line or its encoding.
inline std::string printable(const std::string& s, size_t limit = 40) {
  std::string out = s.substr(0, limit);
  for (char& c : out) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    else if (u < 0x20 || u >= 0x7f) c = '?';
  }
  return s.size() > limit ? out + "..." : out;
}

inline int64_t parse_int(const std::string& s, const std::string& what) {
  int64_t v = 0;
  const char* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, v);
  if (s.empty() || r.ec != std::errc() || r.ptr != end) throw Error(what + ": not an integer: '" + printable(s) + "'");
  return v;
}

inline double parse_double(const std::string& s, const std::string& what) {
  double v = 0;
  const char* end = s.data() + s.size();
  const auto r = std::from_chars(s.data(), end, v);
  if (s.empty() || r.ec != std::errc() || r.ptr != end || !std::isfinite(v))
    throw Error(what + ": not a finite number: '" + printable(s) + "'");
  return v;
}

}  // namespace ddpm
