/* Runs a libuv timer under rp_uv_run and prints the backend. */
#include <ringpark.h>
#include <stdio.h>

static void on_timer(uv_timer_t* t) { *(int*)t->data = 1; }

int main(void) {
  uv_loop_t loop;
  uv_timer_t timer;
  int fired = 0;
  uv_loop_init(&loop);
  uv_timer_init(&loop, &timer);
  timer.data = &fired;
  uv_timer_start(&timer, on_timer, 1, 0);
  rp_uv_run(&loop, UV_RUN_DEFAULT);
  printf("consumer: fired %d on %s\n", fired, rp_backend(&loop));
  uv_close((uv_handle_t*)&timer, NULL);
  rp_uv_run(&loop, UV_RUN_DEFAULT);
  return fired == 1 && rp_loop_close(&loop) == 0 ? 0 : 1;
}
