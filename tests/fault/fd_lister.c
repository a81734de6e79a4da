/* Helper of exec_test.cpp: exec'd by the test, prints one line per open file
 * descriptor above 2 ("<fd> <what it names>"), then "end". The descriptor of
 * the /proc/self/fd listing itself is left out. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == NULL) {
    perror("opendir /proc/self/fd");
    return 2;
  }
  const int own = dirfd(dir);
  struct dirent* e;
  while ((e = readdir(dir)) != NULL) {
    if (e->d_name[0] == '.') continue;
    const int fd = atoi(e->d_name);
    if (fd <= 2 || fd == own) continue;
    char link[64], target[512];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    const ssize_t n = readlink(link, target, sizeof target - 1);
    target[n > 0 ? n : 0] = '\0';
    printf("%d %s\n", fd, target);
  }
  closedir(dir);
  printf("end\n");
  return 0;
}
