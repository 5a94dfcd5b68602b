/* A model of the large-message ping-pong, free of qk: two threads pinned to CPUs 0 and 1 take
 * turns receiving N KiB by copying the other's buffer into their own (a pull, as qk's receiver
 * copies a large put out of the sender's heap part), each sending back from the buffer it just
 * received into, as puma-bench's fair ping-pong does. Modes:
 *   0  the receiver copies it all (qk before copy sharing);
 *   1  the sender copies the second half while the receiver copies the first (copy sharing);
 *   2  as 1, with the split at 5/8;
 *   3  as 0, with the sender writing a byte per line before it sends (puma-bench --rewrite);
 *   4  as 1, but each thread copies the same half in both directions (thread 0 the first, thread 1
 *      the second), so a core copies lines it copied last time;
 *   5  as 4, with the sender's rewrite of mode 3.
 * Prints min / median / max of the copy time (one-way minus the hand-over).
 * An optional third argument picks how the bytes are copied:
 *   0  memcpy (glibc's choice; the default);
 *   1  rep movsb;
 *   2  AVX-512 loads and non-temporal stores (built with -mavx512f only);
 *   3  AVX-512 loads and stores, four lines per step (built with -mavx512f only);
 *   4  as 3, with software prefetch 2 KiB ahead (built with -mavx512f only).
 *
 * Build and run:  cc -O2 -mavx512f -pthread -o pull_copy pull_copy.c && ./pull_copy MODE KIB [COPY]
 * On the machine of crates/qk/ROUNDS.md (twenty-second round), 1 MiB near: mode 0 46 / 74 µs
 * (min / median), mode 1 26 / 37 µs; 4 MiB: 108 / 155 against 46 / 57 µs. Twenty-third round,
 * mode 1 at 1 MiB, two runs of each copy: medians 40.4–46.8 µs for all five, no copy better than
 * memcpy (the cross-core line rate is the bound, not the instructions).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
static int kind;
/* Copies n bytes (a multiple of 256, buffers 64-byte aligned) the way `kind` says. */
static void copy(void *d, const void *s, size_t n) {
  if (kind == 1) {
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return;
  }
#ifdef __AVX512F__
  char *D = d;
  const char *S = s;
  if (kind == 2) {
    for (size_t i = 0; i < n; i += 64)
      _mm512_stream_si512((void *)(D + i), _mm512_load_si512((const void *)(S + i)));
    _mm_sfence();
    return;
  }
  if (kind == 3 || kind == 4) {
    for (size_t i = 0; i < n; i += 256) {
      if (kind == 4)
        for (int l = 0; l < 4; l++) _mm_prefetch(S + i + 2048 + 64 * l, _MM_HINT_T0);
      __m512i a = _mm512_load_si512((const void *)(S + i));
      __m512i b = _mm512_load_si512((const void *)(S + i + 64));
      __m512i c = _mm512_load_si512((const void *)(S + i + 128));
      __m512i e = _mm512_load_si512((const void *)(S + i + 192));
      _mm512_store_si512((void *)(D + i), a);
      _mm512_store_si512((void *)(D + i + 64), b);
      _mm512_store_si512((void *)(D + i + 128), c);
      _mm512_store_si512((void *)(D + i + 192), e);
    }
    return;
  }
#endif
  memcpy(d, s, n);
}
static size_t N;
static char *buf[2];
static _Atomic int turn; // whose turn to receive: 0 or 1 ; helper flag
static _Atomic int help[2];
static int mode; static int iters = 400;
static double ts[2000];
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);pthread_setaffinity_np(pthread_self(),sizeof s,&s);}
static void *th(void*x){int me=(int)(intptr_t)x; pin(me);
  size_t cut = mode==1||mode>=4 ? N/2 : (mode==2? N*5/8 : N);
  size_t mine = me==0 ? 0 : N/2; /* the half a thread keeps in modes 4 and 5 */
  for(int i=0;i<iters;i++){
    int r = i&1; // receiver this hop
    if(r==me){
      while(atomic_load(&turn)!=2*i+1);
      double t0=now();
      if(mode>=4) copy(buf[me]+mine,buf[1-me]+mine,N/2); else
      copy(buf[me],buf[1-me],cut);
      if(cut<N) while(atomic_load(&help[me])!=i+1);
      double t1=now(); if(me==0||1) ts[i]=t1-t0;
      atomic_store(&turn,2*i+2);
    } else {
      while(atomic_load(&turn)!=2*i);
      if(mode==3||mode==5) for(size_t j=0;j<N;j+=64) buf[me][j]++; // rewrite
      atomic_store(&turn,2*i+1);
      if(mode>=4){ copy(buf[1-me]+mine,buf[me]+mine,N/2); atomic_store(&help[1-me],i+1);} else
      if(cut<N){ copy(buf[1-me]+cut,buf[me]+cut,N-cut); atomic_store(&help[1-me],i+1);} 
    }
  }
  return 0;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int c,char**v){
  if(c<3){fprintf(stderr,"usage: %s MODE KIB [COPY]\n",v[0]);return 2;}
  mode=atoi(v[1]); N=(size_t)atoi(v[2])<<10; kind=c>3?atoi(v[3]):0;
#ifndef __AVX512F__
  if(kind>=2){fprintf(stderr,"copy %d needs a build with -mavx512f\n",kind);return 2;}
#endif
  buf[0]=aligned_alloc(4096,N);buf[1]=aligned_alloc(4096,N);memset(buf[0],1,N);memset(buf[1],2,N);
  pthread_t a,b;pthread_create(&a,0,th,(void*)0);pthread_create(&b,0,th,(void*)1);pthread_join(a,0);pthread_join(b,0);
  qsort(ts+20,iters-20,sizeof(double),cmp);
  printf("copy %d mode %d %zu KiB: min %.1f med %.1f max %.1f us\n",kind,mode,N>>10,ts[20]/1e3,ts[20+(iters-20)/2]/1e3,ts[iters-1]/1e3);}
