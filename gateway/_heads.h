/* The handshake's compiled head readers (gateway/_heads.c), part of gateway._relay. */
#ifndef GATEWAY_HEADS_H
#define GATEWAY_HEADS_H

#include <Python.h>

/* scan_request and scan_switching, the module's functions. */
extern PyMethodDef heads_methods[];

/* Fills the character tables; called once, when the module is created. */
void heads_init(void);

#endif
