#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
typedef struct { uint8_t palette_id, start_row, rsv[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) {perror("perm");return 1;}
  cfg_t c; memset(&c,0,sizeof c); c.palette_id=1;
  for(int i=0;i<8;i++){c.colsb[i]=64;c.rows[i]=16;}
  _tile_loadconfig(&c);
  static uint16_t buf[16*32] __attribute__((aligned(64)));
  _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64);
  _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
  for (int chunk=0; chunk<40; chunk++){
    double t0=now(); long n=0;
    while(now()-t0<0.005){ for(int i=0;i<256;i++){ _tile_dpbf16ps(0,4,5);_tile_dpbf16ps(1,4,5);_tile_dpbf16ps(2,4,5);_tile_dpbf16ps(3,4,5);} n+=1024; }
    double dt=now()-t0; printf("%.1f ", dt/n*1e9);
  }
  printf("ns per tdpbf16ps\n");
  _tile_release();
}
