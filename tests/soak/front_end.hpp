// The TCP front ends the soak drives. The soak's echo clients and server speak
// to a stream through this interface only, so that every front end of the
// stream engine can be soaked by the same workload: today rp_tcp_t; next, an
// adopted uv_tcp_t (an unchanged libuv program's TCP under ringpark) and the
// C++ TcpStream. A front end adapts its API's callbacks to StreamEvents.
//
// Rules every front end keeps (the soak checks them):
// - every call that returns 0 is answered by exactly one event (connect by
//   on_connect, write by on_write, shutdown by on_shutdown, close by
//   on_close); a call that returns an error is answered by none;
// - on_close is the last event of a stream; the stream may be deleted from
//   inside it;
// - on_read(n > 0) hands over bytes valid only during the call.
// Loop thread only, like the APIs underneath.
#pragma once

#include <netinet/in.h>
#include <sys/types.h>
#include <uv.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

namespace soak {

class Stream;

// What a stream reports to its owner.
class StreamEvents {
 public:
  virtual ~StreamEvents() = default;
  virtual void on_connect(Stream& s, int status) = 0;
  // n > 0: bytes; UV_EOF; another negative UV_E* code: an error (reading has
  // stopped). UV_ECANCELED never reaches here (front ends absorb the buffer
  // they get back at close).
  virtual void on_read(Stream& s, ssize_t n, const char* bytes) = 0;
  virtual void on_write(Stream& s, void* token, int status) = 0;
  virtual void on_shutdown(Stream& s, int status) = 0;
  virtual void on_close(Stream& s) = 0;
};

class Stream {
 public:
  virtual ~Stream() = default;
  virtual int connect(const sockaddr_in& to) = 0;
  virtual int read_start() = 0;
  virtual int read_stop() = 0;
  // `data` stays valid until on_write(token).
  virtual int write(const char* data, std::size_t len, void* token) = 0;
  virtual int shutdown() = 0;
  virtual int close() = 0;

  void* owner = nullptr;  // the soak's object behind this stream
};

class Listener {
 public:
  virtual ~Listener() = default;
  virtual sockaddr_in address() const = 0;
  // Stops accepting; `done` runs once the listener is closed. The listener
  // may be deleted from inside `done`.
  virtual int close(std::function<void()> done) = 0;
};

class FrontEnd {
 public:
  virtual ~FrontEnd() = default;
  virtual const char* name() const = 0;
  // A new unconnected stream on `loop`, reporting to `events`.
  virtual Stream* new_stream(uv_loop_t* loop, StreamEvents* events) = 0;
  // A listener on 127.0.0.1 (a port of the kernel's choice). Each accepted
  // connection becomes a new Stream reporting to `events`, handed to
  // `accepted` (nullptr and a negative status for an accept error).
  virtual Listener* listen(uv_loop_t* loop, StreamEvents* events,
                           std::function<void(Stream*, int status)> accepted) = 0;
};

// The front ends by name ("rp_tcp"); null for an unknown name.
std::unique_ptr<FrontEnd> make_front_end(const std::string& name);
// Their names, for --help.
const char* front_end_names();

}  // namespace soak
