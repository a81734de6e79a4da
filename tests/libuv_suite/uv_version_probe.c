/* Prints uv_version_string() of the libuv at the given path (the one the
 * test runner resolves), so run.sh can check the tests run on 1.44.2. */
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char** argv) {
  void* h;
  const char* (*version)(void);
  if (argc != 2) {
    fprintf(stderr, "usage: %s /path/to/libuv.so.1\n", argv[0]);
    return 2;
  }
  h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) {
    fprintf(stderr, "dlopen: %s\n", dlerror());
    return 1;
  }
  *(void**)&version = dlsym(h, "uv_version_string");
  if (version == NULL) {
    fprintf(stderr, "dlsym: %s\n", dlerror());
    return 1;
  }
  puts(version());
  return 0;
}
