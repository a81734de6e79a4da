# install(): libraries, public headers, a CMake package so that
# find_package(ringpark) works from the install prefix, and ringpark.pc.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS ringpark ringpark_static EXPORT ringparkTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS ringpark-preload LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES include/ringpark.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY include/ringpark DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

install(EXPORT ringparkTargets NAMESPACE ringpark::
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/ringpark)
configure_package_config_file(cmake/ringparkConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/ringparkConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/ringpark)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/ringparkConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/ringparkConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/ringparkConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/ringpark)

file(RELATIVE_PATH RINGPARK_PC_TO_PREFIX "/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/")
string(REGEX REPLACE "/$" "" RINGPARK_PC_TO_PREFIX "${RINGPARK_PC_TO_PREFIX}")
configure_file(cmake/ringpark.pc.in ${CMAKE_CURRENT_BINARY_DIR}/ringpark.pc @ONLY)
configure_file(cmake/ringpark-preload.pc.in ${CMAKE_CURRENT_BINARY_DIR}/ringpark-preload.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/ringpark.pc ${CMAKE_CURRENT_BINARY_DIR}/ringpark-preload.pc
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
