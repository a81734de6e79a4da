# Injected into libuv's own CMakeLists.txt through CMAKE_PROJECT_INCLUDE (runs
# right after libuv's project() call). It changes nothing in libuv's source; at
# the end of the directory (cmake_language(DEFER)) it re-targets uv_run_tests:
#   - links the SYSTEM libuv.so.1 (RP_LIBUV) instead of the libuv built from
#     source, so exactly one libuv (the one libringpark.so uses) is loaded;
#   - in ringpark mode (RP_MODE=ringpark) adds uv_run_wrap.c, links
#     -Wl,--wrap=uv_run and libringpark.so (RP_LIB), so that every uv_run call
#     of the test objects goes to rp_uv_run. The wrap applies to this
#     executable's objects only; libringpark.so's own uv_run call is untouched.
cmake_minimum_required(VERSION 3.19)

foreach(_v RP_MODE RP_LIBUV RP_WRAP_SOURCE)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "uv_hook.cmake: ${_v} not set")
  endif()
endforeach()
if(RP_MODE STREQUAL "ringpark")
  foreach(_v RP_LIB RP_INCLUDE)
    if(NOT DEFINED ${_v})
      message(FATAL_ERROR "uv_hook.cmake: ${_v} not set")
    endif()
  endforeach()
elseif(NOT RP_MODE STREQUAL "plain")
  message(FATAL_ERROR "uv_hook.cmake: RP_MODE must be ringpark or plain")
endif()

function(rp_retarget_uv_run_tests)
  if(NOT TARGET uv_run_tests)
    message(FATAL_ERROR "uv_hook.cmake: libuv defined no uv_run_tests target "
                        "(is BUILD_TESTING/LIBUV_BUILD_TESTS on?)")
  endif()
  get_target_property(_libs uv_run_tests LINK_LIBRARIES)
  list(FIND _libs uv _i)
  if(_i EQUAL -1)
    message(FATAL_ERROR "uv_hook.cmake: uv_run_tests does not link target uv: ${_libs}")
  endif()
  list(REMOVE_ITEM _libs uv)
  # What target uv gave through its interface, minus the library itself.
  target_include_directories(uv_run_tests PRIVATE "${PROJECT_SOURCE_DIR}/include")
  target_compile_definitions(uv_run_tests PRIVATE USING_UV_SHARED=1)
  set(_pre "")
  if(RP_MODE STREQUAL "ringpark")
    # Own object library: its own C standard, and ringpark.h's folder is seen
    # by this one file only, never by libuv's test sources.
    add_library(rp_uv_run_wrap OBJECT "${RP_WRAP_SOURCE}")
    # Default visibility: GNU ld maps the undefined uv_run of libringpark.so
    # to __wrap_uv_run at link time too and refuses a hidden definition
    # ("hidden symbol `__wrap_uv_run' ... is referenced by DSO"). At run time
    # libringpark.so still binds its uv_run by name, to libuv's uv_run.
    set_target_properties(rp_uv_run_wrap PROPERTIES C_STANDARD 11 C_EXTENSIONS ON
                          C_VISIBILITY_PRESET default)
    target_include_directories(rp_uv_run_wrap PRIVATE "${RP_INCLUDE}")
    target_compile_options(rp_uv_run_wrap PRIVATE -Wall -Wextra -Werror)
    target_sources(uv_run_tests PRIVATE $<TARGET_OBJECTS:rp_uv_run_wrap>)
    target_link_options(uv_run_tests PRIVATE "-Wl,--wrap=uv_run")
    list(APPEND _pre "${RP_LIB}")
  endif()
  set_property(TARGET uv_run_tests PROPERTY LINK_LIBRARIES ${_pre} "${RP_LIBUV}" ${_libs})
  message(STATUS "ringpark: uv_run_tests mode=${RP_MODE} links: ${_pre} ${RP_LIBUV} ${_libs}")
endfunction()

cmake_language(DEFER CALL rp_retarget_uv_run_tests)
