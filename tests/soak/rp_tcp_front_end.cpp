// The soak's rp_tcp_t front end: StreamEvents over ringpark's libuv-shaped
// TCP handles. Each request is a heap object freed in its own callback; read
// buffers are malloc'd in alloc_cb and freed in read_cb, whatever the result.
#include <cstdlib>
#include <cstring>

#include "front_end.hpp"
#include "ringpark.h"

namespace soak {
namespace {

class RpStream final : public Stream {
 public:
  RpStream(uv_loop_t* loop, StreamEvents* events, int* init_error) : events_(events) {
    handle_.data = this;
    *init_error = rp_tcp_init(loop, &handle_);
  }

  rp_tcp_t* handle() { return &handle_; }

  int connect(const sockaddr_in& to) override {
    auto* req = new Connect{{}, this};
    req->req.data = req;
    int r = rp_tcp_connect(&req->req, &handle_, reinterpret_cast<const sockaddr*>(&to),
                           [](rp_connect_t* c, int status) {
                             auto* req = static_cast<Connect*>(c->data);
                             RpStream* s = req->stream;
                             delete req;
                             s->events_->on_connect(*s, status);
                           });
    if (r != 0) delete req;
    return r;
  }

  int read_start() override {
    return rp_read_start(
        &handle_,
        [](rp_tcp_t*, size_t suggested, uv_buf_t* buf) {
          *buf = uv_buf_init(static_cast<char*>(std::malloc(suggested)),
                             static_cast<unsigned>(suggested));
        },
        [](rp_tcp_t* h, ssize_t n, const uv_buf_t* buf) {
          auto* s = static_cast<RpStream*>(h->data);
          if (n != 0 && n != UV_ECANCELED) s->events_->on_read(*s, n, buf->base);
          std::free(buf->base);
        });
  }

  int read_stop() override { return rp_read_stop(&handle_); }

  int write(const char* data, std::size_t len, void* token) override {
    auto* req = new Write{{}, this, token};
    req->req.data = req;
    uv_buf_t b = uv_buf_init(const_cast<char*>(data), static_cast<unsigned>(len));
    int r = rp_write(&req->req, &handle_, &b, 1, [](rp_write_t* w, int status) {
      auto* req = static_cast<Write*>(w->data);
      RpStream* s = req->stream;
      void* token = req->token;
      delete req;
      s->events_->on_write(*s, token, status);
    });
    if (r != 0) delete req;
    return r;
  }

  int shutdown() override {
    auto* req = new Shutdown{{}, this};
    req->req.data = req;
    int r = rp_shutdown(&req->req, &handle_, [](rp_shutdown_t* sh, int status) {
      auto* req = static_cast<Shutdown*>(sh->data);
      RpStream* s = req->stream;
      delete req;
      s->events_->on_shutdown(*s, status);
    });
    if (r != 0) delete req;
    return r;
  }

  int close() override {
    return rp_close(&handle_, [](rp_tcp_t* h) {
      auto* s = static_cast<RpStream*>(h->data);
      s->events_->on_close(*s);  // may delete s
    });
  }

 private:
  struct Connect {
    rp_connect_t req;
    RpStream* stream;
  };
  struct Write {
    rp_write_t req;
    RpStream* stream;
    void* token;
  };
  struct Shutdown {
    rp_shutdown_t req;
    RpStream* stream;
  };

  rp_tcp_t handle_{};
  StreamEvents* events_;
};

class RpListener final : public Listener {
 public:
  RpListener(uv_loop_t* loop, StreamEvents* events, std::function<void(Stream*, int)> accepted)
      : loop_(loop), events_(events), accepted_(std::move(accepted)) {
    handle_.data = this;
  }

  int start() {
    if (int r = rp_tcp_init(loop_, &handle_); r != 0) return r;
    sockaddr_in any{};
    uv_ip4_addr("127.0.0.1", 0, &any);
    if (int r = rp_tcp_bind(&handle_, reinterpret_cast<const sockaddr*>(&any), 0); r != 0) return r;
    int len = sizeof address_;
    if (int r = rp_tcp_getsockname(&handle_, reinterpret_cast<sockaddr*>(&address_), &len); r != 0)
      return r;
    return rp_listen(&handle_, 511, [](rp_tcp_t* server, int status) {
      auto* self = static_cast<RpListener*>(server->data);
      if (status != 0) return self->accepted_(nullptr, status);
      int init_error = 0;
      auto* s = new RpStream(self->loop_, self->events_, &init_error);
      if (init_error != 0) {
        delete s;
        return self->accepted_(nullptr, init_error);
      }
      if (int r = rp_accept(server, s->handle()); r != 0) {
        // Initialised but never given a socket: it still closes through the
        // loop, and only then may it go.
        rp_close(s->handle(), [](rp_tcp_t* h) { delete static_cast<RpStream*>(h->data); });
        return self->accepted_(nullptr, r);
      }
      self->accepted_(s, 0);
    });
  }

  sockaddr_in address() const override { return address_; }

  int close(std::function<void()> done) override {
    done_ = std::move(done);
    return rp_close(&handle_, [](rp_tcp_t* h) {
      auto* self = static_cast<RpListener*>(h->data);
      auto done = std::move(self->done_);
      done();  // may delete self
    });
  }

 private:
  rp_tcp_t handle_{};
  uv_loop_t* loop_;
  StreamEvents* events_;
  std::function<void(Stream*, int)> accepted_;
  std::function<void()> done_;
  sockaddr_in address_{};
};

class RpTcpFrontEnd final : public FrontEnd {
 public:
  const char* name() const override { return "rp_tcp"; }
  Stream* new_stream(uv_loop_t* loop, StreamEvents* events) override {
    int init_error = 0;
    auto* s = new RpStream(loop, events, &init_error);
    if (init_error != 0) {
      delete s;
      return nullptr;
    }
    return s;
  }
  Listener* listen(uv_loop_t* loop, StreamEvents* events,
                   std::function<void(Stream*, int)> accepted) override {
    auto* l = new RpListener(loop, events, std::move(accepted));
    if (l->start() != 0) {
      // Fatal for the soak, which then exits without closing the loop: the
      // handle rp_tcp_init made is simply abandoned with it.
      delete l;
      return nullptr;
    }
    return l;
  }
};

}  // namespace

std::unique_ptr<FrontEnd> make_front_end(const std::string& name) {
  if (name == "rp_tcp") return std::make_unique<RpTcpFrontEnd>();
  return nullptr;
}

const char* front_end_names() { return "rp_tcp"; }

}  // namespace soak
