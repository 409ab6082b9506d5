// Whole-string number parsing shared by the library (metadata) and the command (flags). std::from_chars, not
// strtod: it ignores the C locale, which an embedding program may have set to one with a decimal comma.
#pragma once
#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>

#include "ddpm/sampler.h"

namespace ddpm {

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
    throw Error(what + ": not a number: '" + printable(s) + "'");
  return v;
}

}  // namespace ddpm
