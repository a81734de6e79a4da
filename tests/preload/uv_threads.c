/* An ordinary libuv program, built without ringpark (it links libuv only), with
 * a loop per thread: each of THREADS threads makes its own loop and, on it, a
 * repeating uv_timer and a chain of file requests (open, write, read, close,
 * unlink on a file of its own), and drives the loop with many short uv_run
 * calls (NOWAIT, ONCE) before a final uv_run(DEFAULT). All threads start
 * together, so under LD_PRELOAD=libringpark-preload.so their first uv_run
 * calls, and every later one, overlap: a write to shared state on each call
 * (issue 8, defect 4) is what ThreadSanitizer reports then.
 *
 * Prints "threads: ok" and exits 0 when every thread saw its timer fire
 * TICKS times and read back what it wrote; exits 1 otherwise. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#define THREADS 4
#define TICKS 5

struct worker {
  int index;
  uv_loop_t loop;
  uv_timer_t timer;
  int ticks;
  uv_fs_t req;
  uv_file file;
  char path[256];
  char text[64];
  char back[64];
  uv_buf_t buf;
  int fs_done; /* 1 after a correct read-back and unlink, -1 on an error */
  int ok;
};

static pthread_barrier_t start_line;

static void fail(struct worker* w, const char* what, ssize_t result) {
  fprintf(stderr, "uv_threads: thread %d: %s: %s\n", w->index, what,
          result < 0 ? uv_strerror((int)result) : "wrong result");
  w->fs_done = -1;
}

static void on_unlink(uv_fs_t* req) {
  struct worker* w = req->data;
  ssize_t r = req->result;
  uv_fs_req_cleanup(req);
  if (r != 0) return fail(w, "unlink", r);
  w->fs_done = 1;
}

static void on_close(uv_fs_t* req) {
  struct worker* w = req->data;
  ssize_t r = req->result;
  uv_fs_req_cleanup(req);
  if (r != 0) return fail(w, "close", r);
  if (uv_fs_unlink(&w->loop, &w->req, w->path, on_unlink) != 0) fail(w, "uv_fs_unlink", -1);
}

static void on_read(uv_fs_t* req) {
  struct worker* w = req->data;
  ssize_t r = req->result;
  uv_fs_req_cleanup(req);
  if (r != (ssize_t)strlen(w->text) || memcmp(w->back, w->text, (size_t)r) != 0)
    return fail(w, "read", r);
  if (uv_fs_close(&w->loop, &w->req, w->file, on_close) != 0) fail(w, "uv_fs_close", -1);
}

static void on_write(uv_fs_t* req) {
  struct worker* w = req->data;
  ssize_t r = req->result;
  uv_fs_req_cleanup(req);
  if (r != (ssize_t)strlen(w->text)) return fail(w, "write", r);
  w->buf = uv_buf_init(w->back, sizeof w->back);
  if (uv_fs_read(&w->loop, &w->req, w->file, &w->buf, 1, 0, on_read) != 0)
    fail(w, "uv_fs_read", -1);
}

static void on_open(uv_fs_t* req) {
  struct worker* w = req->data;
  ssize_t r = req->result;
  uv_fs_req_cleanup(req);
  if (r < 0) return fail(w, "open", r);
  w->file = (uv_file)r;
  w->buf = uv_buf_init(w->text, (unsigned)strlen(w->text));
  if (uv_fs_write(&w->loop, &w->req, w->file, &w->buf, 1, 0, on_write) != 0)
    fail(w, "uv_fs_write", -1);
}

static void on_tick(uv_timer_t* timer) {
  struct worker* w = timer->data;
  if (++w->ticks == TICKS) uv_close((uv_handle_t*)timer, NULL);
}

static void* run(void* arg) {
  struct worker* w = arg;
  const char* tmp = getenv("TMPDIR");
  snprintf(w->path, sizeof w->path, "%s/uv_threads-%d-%d", tmp && *tmp ? tmp : "/tmp",
           (int)getpid(), w->index);
  snprintf(w->text, sizeof w->text, "thread %d was here", w->index);
  if (uv_loop_init(&w->loop) != 0) return NULL;
  uv_timer_init(&w->loop, &w->timer);
  w->timer.data = w;
  w->req.data = w;
  pthread_barrier_wait(&start_line);
  uv_timer_start(&w->timer, on_tick, 1, 1);
  if (uv_fs_open(&w->loop, &w->req, w->path, O_CREAT | O_RDWR | O_TRUNC, 0600, on_open) != 0)
    fail(w, "uv_fs_open", -1);
  /* Many short runs, so that the threads' uv_run calls overlap. */
  for (int i = 0; i < 200 && uv_loop_alive(&w->loop); ++i)
    uv_run(&w->loop, i % 2 ? UV_RUN_NOWAIT : UV_RUN_ONCE);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  w->ok = w->ticks == TICKS && w->fs_done == 1;
  if (w->ticks != TICKS)
    fprintf(stderr, "uv_threads: thread %d: %d ticks, expected %d\n", w->index, w->ticks, TICKS);
  int r = uv_loop_close(&w->loop);
  if (r != 0) {
    fprintf(stderr, "uv_threads: thread %d: uv_loop_close: %s\n", w->index, uv_strerror(r));
    w->ok = 0;
  }
  return NULL;
}

int main(void) {
  static struct worker workers[THREADS];
  pthread_t threads[THREADS];
  int ok = 1;
  pthread_barrier_init(&start_line, NULL, THREADS);
  for (int i = 0; i < THREADS; ++i) {
    workers[i].index = i;
    if (pthread_create(&threads[i], NULL, run, &workers[i]) != 0) {
      fprintf(stderr, "uv_threads: pthread_create failed\n");
      return 1;
    }
  }
  for (int i = 0; i < THREADS; ++i) {
    pthread_join(threads[i], NULL);
    ok = ok && workers[i].ok;
  }
  printf("threads: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
