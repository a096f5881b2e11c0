"""mpi_server"""
